/*
 * popek-verify: lets a guest check its host's attestation quote.
 *
 *   popek-verify nonce
 *       Makes a fresh 32-byte nonce, keeps it in /run/popek-verify.nonce
 *       (one use only) and prints it in hex: hand it to the host, which
 *       answers with `popek attest NAME --nonce HEX`.
 *   popek-verify extend
 *       At boot (rcS): extends PCR 15 of the virtual TPM with the 32-byte
 *       launch measurement popek hands the guest through fw_cfg
 *       (opt/org.popek/measurement), as firmware would measure what it loads.
 *   popek-verify check PUBKEY_B64 EXPECTED_HEX [QUOTE_FILE]
 *       Reads the quote (stdin when no file is given) and checks, in order:
 *       the Ed25519 signature of the host's attestation key (PUBKEY_B64, the
 *       base64 of its 32 bytes, given to the guest owner out of band) over
 *       the purpose prefix and the signed payload; that the payload answers
 *       the nonce this guest made (then forgotten, so a replayed quote
 *       fails); that the measurement is EXPECTED_HEX; and, when the guest has
 *       a TPM, that PCR 15 holds exactly that measurement extended once from
 *       zero (the quote is about the launch this guest booted from).
 *       Exit 0 when all hold.
 *
 * Built statically against libsodium by popek's minimal image builder.
 * The payload is canonical JSON (sorted keys, no spaces), so the nonce and
 * measurement fields can be matched as exact strings.
 */
#include <errno.h>
#include <fcntl.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PREFIX "popek/attestation-quote/v1\n"
#define NONCE_DIR "/run"
#define NONCE_FILE "/run/popek-verify.nonce"
#define NONCE_BYTES 32
#define MAX_QUOTE (4 << 20)
#define FW_CFG "/sys/firmware/qemu_fw_cfg/by_name/opt/org.popek/measurement/raw"
#define TPM_DEV "/dev/tpm0"
#define PCR15 "/sys/class/tpm/tpm0/pcr-sha256/15"

static int fail(const char *what) {
    fprintf(stderr, "popek-verify: REJECTED: %s\n", what);
    return 1;
}

static int make_nonce(void) {
    unsigned char raw[NONCE_BYTES];
    char hex[2 * NONCE_BYTES + 1];
    randombytes_buf(raw, sizeof raw);
    sodium_bin2hex(hex, sizeof hex, raw, sizeof raw);
    if (mkdir(NONCE_DIR, 0755) != 0 && errno != EEXIST)
        return fail("cannot create " NONCE_DIR);
    int fd = open(NONCE_FILE, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || write(fd, hex, strlen(hex)) != (ssize_t)strlen(hex) || close(fd) != 0)
        return fail("cannot keep the nonce in " NONCE_FILE);
    printf("%s\n", hex);
    return 0;
}

static int read_exact(const char *path, unsigned char *buf, size_t n) {
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -1;
    ssize_t got = read(fd, buf, n);
    close(fd);
    return got == (ssize_t)n ? 0 : -1;
}

/* TPM2_PCR_Extend(PCR 15, SHA-256 digest) with an empty password session. */
static int extend(void) {
    unsigned char m[32], cmd[65], rsp[64];
    if (read_exact(FW_CFG, m, sizeof m) != 0)
        return fail("no launch measurement in fw_cfg (" FW_CFG ")");
    static const unsigned char head[] = {
        0x80, 0x02,             /* TPM_ST_SESSIONS */
        0x00, 0x00, 0x00, 0x41, /* size 65 */
        0x00, 0x00, 0x01, 0x82, /* TPM_CC_PCR_Extend */
        0x00, 0x00, 0x00, 0x0f, /* PCR 15 */
        0x00, 0x00, 0x00, 0x09, /* authorization area: 9 bytes */
        0x40, 0x00, 0x00, 0x09, /* TPM_RS_PW */
        0x00, 0x00, 0x00, 0x00, 0x00, /* no nonce, no attributes, empty password */
        0x00, 0x00, 0x00, 0x01, /* one digest */
        0x00, 0x0b,             /* TPM_ALG_SHA256 */
    };
    memcpy(cmd, head, sizeof head);
    memcpy(cmd + sizeof head, m, sizeof m);
    int fd = open(TPM_DEV, O_RDWR);
    if (fd < 0)
        return fail("no TPM at " TPM_DEV);
    if (write(fd, cmd, sizeof cmd) != (ssize_t)sizeof cmd)
        return fail("the TPM refused the extend command");
    ssize_t got = read(fd, rsp, sizeof rsp);
    close(fd);
    if (got < 10 || rsp[6] || rsp[7] || rsp[8] || rsp[9])
        return fail("the TPM answered the extend with an error");
    char hex[65];
    sodium_bin2hex(hex, sizeof hex, m, sizeof m);
    printf("popek-verify: launch measurement %s extended into PCR 15\n", hex);
    return 0;
}

/* When the guest has a TPM: PCR 15 must be SHA-256(32 zero bytes || measurement). */
static int check_pcr(const char *expected) {
    char text[80] = {0};
    int fd = open(PCR15, O_RDONLY);
    if (fd < 0)
        return 0; /* no TPM: nothing more to compare */
    ssize_t got = read(fd, text, sizeof text - 1);
    close(fd);
    unsigned char chain[64] = {0}, want[32], pcr[32];
    size_t n = 0;
    if (sodium_hex2bin(chain + 32, 32, expected, 64, NULL, &n, NULL) != 0 || n != 32)
        return fail("the expected measurement is not hex");
    crypto_hash_sha256(want, chain, sizeof chain);
    if (got < 64 || sodium_hex2bin(pcr, sizeof pcr, text, 64, NULL, &n, NULL) != 0 || n != 32)
        return fail("cannot read PCR 15");
    if (memcmp(pcr, want, sizeof want) != 0)
        return fail("PCR 15 does not hold this measurement: the quote is not about the launch "
                    "this guest booted from");
    return 0;
}

/* The string value of "key" in a JSON document (no escapes expected in it). */
static char *json_string(const char *doc, const char *key) {
    char pattern[64];
    snprintf(pattern, sizeof pattern, "\"%s\"", key);
    const char *p = strstr(doc, pattern);
    if (!p)
        return NULL;
    p += strlen(pattern);
    while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')
        p++;
    if (*p++ != ':')
        return NULL;
    while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')
        p++;
    if (*p++ != '"')
        return NULL;
    const char *end = strchr(p, '"');
    if (!end)
        return NULL;
    return strndup(p, (size_t)(end - p));
}

static char *read_all(FILE *f, size_t *len) {
    char *buf = malloc(MAX_QUOTE + 1);
    if (!buf)
        return NULL;
    *len = fread(buf, 1, MAX_QUOTE, f);
    buf[*len] = '\0';
    return buf;
}

static int check(const char *pub_b64, const char *expected, const char *path) {
    unsigned char pk[crypto_sign_PUBLICKEYBYTES], sig[crypto_sign_BYTES];
    size_t n = 0;
    char nonce[2 * NONCE_BYTES + 1] = {0};

    int fd = open(NONCE_FILE, O_RDONLY);
    if (fd < 0)
        return fail("no outstanding nonce: run 'popek-verify nonce' first");
    ssize_t got = read(fd, nonce, sizeof nonce - 1);
    close(fd);
    unlink(NONCE_FILE); /* one use: a replayed quote cannot match again */
    if (got != 2 * NONCE_BYTES)
        return fail("the kept nonce is damaged");

    if (sodium_base642bin(pk, sizeof pk, pub_b64, strlen(pub_b64), NULL, &n, NULL,
                          sodium_base64_VARIANT_ORIGINAL) != 0 || n != sizeof pk)
        return fail("the public key is not base64 of 32 bytes");

    FILE *f = path ? fopen(path, "rb") : stdin;
    if (!f)
        return fail("cannot open the quote");
    size_t len;
    char *doc = read_all(f, &len);
    if (!doc || len == 0)
        return fail("empty quote");
    char *payload_b64 = json_string(doc, "payload");
    char *sig_b64 = json_string(doc, "signature");
    if (!payload_b64 || !sig_b64)
        return fail("not a popek quote (no payload or signature)");
    if (sodium_base642bin(sig, sizeof sig, sig_b64, strlen(sig_b64), NULL, &n, NULL,
                          sodium_base64_VARIANT_ORIGINAL) != 0 || n != sizeof sig)
        return fail("the signature is not base64 of 64 bytes");

    size_t plen = strlen(PREFIX);
    unsigned char *msg = malloc(plen + strlen(payload_b64) + 1);
    if (!msg)
        return fail("out of memory");
    memcpy(msg, PREFIX, plen);
    size_t body_len = 0;
    if (sodium_base642bin(msg + plen, strlen(payload_b64), payload_b64, strlen(payload_b64),
                          NULL, &body_len, NULL, sodium_base64_VARIANT_ORIGINAL) != 0)
        return fail("the payload is not base64");
    if (crypto_sign_verify_detached(sig, msg, plen + body_len, pk) != 0)
        return fail("the signature does not match (wrong host key or altered quote)");

    char *body = strndup((const char *)msg + plen, body_len);
    char want[256];
    snprintf(want, sizeof want, "\"nonce\":\"%s\"", nonce);
    if (!body || !strstr(body, want))
        return fail("the quote answers another nonce (replayed or stale)");
    if (strlen(expected) != 64)
        return fail("the expected measurement must be 64 hex digits");
    snprintf(want, sizeof want, "\"measurement\":\"%s\"", expected);
    if (!strstr(body, want))
        return fail("the measurement is not the expected one: the launch changed");
    if (check_pcr(expected) != 0)
        return 1;
    printf("popek-verify: quote verified: this guest runs the expected launch %s\n", expected);
    return 0;
}

int main(int argc, char **argv) {
    if (sodium_init() < 0)
        return fail("libsodium did not initialise");
    if (argc == 2 && strcmp(argv[1], "nonce") == 0)
        return make_nonce();
    if (argc == 2 && strcmp(argv[1], "extend") == 0)
        return extend();
    if ((argc == 4 || argc == 5) && strcmp(argv[1], "check") == 0)
        return check(argv[2], argv[3], argc == 5 ? argv[4] : NULL);
    fprintf(stderr, "usage: popek-verify nonce\n"
                    "       popek-verify extend\n"
                    "       popek-verify check PUBKEY_B64 EXPECTED_HEX [QUOTE_FILE]\n");
    return 2;
}
