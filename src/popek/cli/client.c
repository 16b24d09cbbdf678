/*
 * popek's native front: the `popek` command when it was built (scripts/setup.sh).
 *
 * It does what popek/cli/client.py does, without an interpreter to start
 * (about 20 ms of a command on a slow host): hand argv, the working
 * directory, the umask, the environment and stdin/stdout/stderr (SCM_RIGHTS) to the warm
 * command server (popek/cli/cmdserver.py), forward SIGINT, SIGTERM, SIGHUP
 * and SIGQUIT to the command's process, and exit with its code.  It holds no
 * policy of its own: whenever the server is absent, stale, or says a command
 * must run in-process ("L": interactive ones), or popek runs unprivileged or
 * with POPEK_CLI_SERVER=off, it executes the Python client, which decides
 * and falls back (and starts a server).  The protocol is client.py's, and so is
 * its trust rule: a listener that does not run as root (SO_PEERCRED) is refused
 * before anything is sent, and only a pid above 1 from a verified server is signalled.
 *
 * Built with -DPOPEK_PYTHON="..." -DPOPEK_SRC="..." -DPOPEK_SOCKET="..." (the
 * venv's interpreter, the directory holding the popek package, and this
 * installation's server socket) by `python -m popek.cli.client TARGET`.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef POPEK_PYTHON
#error "build with -DPOPEK_PYTHON=\"/path/to/python\""
#endif
#ifndef POPEK_SRC
#error "build with -DPOPEK_SRC=\"/path/containing/popek\""
#endif

#ifndef POPEK_SOCKET
#error "build with -DPOPEK_SOCKET=\"/run/popek/cli-....sock\" (client.py's SOCKET)"
#endif
#define MAGIC "popek-cmd/1"

extern char **environ;
static volatile pid_t child;
static volatile int forwarded;

static void forward(int sig) {
    forwarded = sig;
    if (child > 0)
        kill(child, sig);
}

/* Run the command with the Python client (which may still use a server). */
static void python(int argc, char **argv) {
    static const char boot[] =
        "import sys; sys.path.insert(0, " "'" POPEK_SRC "'" ")\n"
        "from popek.cli.client import main\nmain()\n";
    char **args = calloc((size_t)argc + 4, sizeof(char *));
    if (!args) {
        perror("popek");
        exit(1);
    }
    args[0] = POPEK_PYTHON; /* Python derives sys.executable from it */
    args[1] = "-IS";        /* isolated as the server: no PYTHONPATH, no user site, no cwd */
    args[2] = "-c";
    args[3] = (char *)boot;
    for (int i = 1; i < argc; i++)
        args[3 + i] = argv[i];
    execv(POPEK_PYTHON, args);
    fprintf(stderr, "popek: cannot run %s: %s\n", POPEK_PYTHON, strerror(errno));
    exit(127);
}

/* Append one NUL-separated field to the request buffer. */
static int add(char **buf, size_t *len, size_t *cap, const char *s, int first) {
    size_t n = strlen(s) + (first ? 0 : 1);
    if (*len + n > *cap) {
        size_t want = (*cap ? *cap : 4096);
        while (want < *len + n)
            want *= 2;
        char *grown = realloc(*buf, want);
        if (!grown)
            return -1;
        *buf = grown;
        *cap = want;
    }
    if (!first)
        (*buf)[(*len)++] = '\0';
    memcpy(*buf + *len, s, n - (first ? 0 : 1));
    *len += n - (first ? 0 : 1);
    return 0;
}

/* Send the request; 0 when sent, -1 when there is no server to take it. */
static int send_request(int sock, int argc, char **argv) {
    char *buf = NULL, cwd[4096], count[16], mask[8];
    size_t len = 0, cap = 0;
    if (!getcwd(cwd, sizeof cwd))
        return -1;
    mode_t old = umask(077);
    umask(old);
    snprintf(mask, sizeof mask, "%o", (unsigned)old);
    snprintf(count, sizeof count, "%d", argc - 1);
    int bad = add(&buf, &len, &cap, MAGIC, 1) || add(&buf, &len, &cap, cwd, 0) ||
              add(&buf, &len, &cap, mask, 0) || add(&buf, &len, &cap, count, 0);
    for (int i = 1; !bad && i < argc; i++)
        bad = add(&buf, &len, &cap, argv[i], 0);
    for (char **e = environ; !bad && *e; e++)
        bad = add(&buf, &len, &cap, *e, 0);
    if (bad) {
        free(buf);
        return -1;
    }
    int fds[3] = {0, 1, 2};
    char control[CMSG_SPACE(sizeof fds)];
    memset(control, 0, sizeof control);
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = sizeof control};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cm), fds, sizeof fds);
    ssize_t sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
    size_t done = sent > 0 ? (size_t)sent : 0;
    while (sent >= 0 && done < len) {  /* the descriptors went with the first bytes */
        sent = send(sock, buf + done, len - done, MSG_NOSIGNAL);
        if (sent > 0)
            done += (size_t)sent;
    }
    free(buf);
    if (sent < 0)
        return -1;
    shutdown(sock, SHUT_WR);
    return 0;
}

/* The uid of the process listening at the other end of sock (SO_PEERCRED); -1 unknown. */
static long peer_uid(int sock) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || len != sizeof cred)
        return -1;
    return (long)cred.uid;
}

/* A whole decimal number of at most 10 digits, or -1. */
static long number(const char *s) {
    long n = 0;
    size_t i = 0;
    for (; s[i] >= '0' && s[i] <= '9' && i < 10; i++)
        n = n * 10 + (s[i] - '0');
    return (i == 0 || s[i] != '\0') ? -1 : n;
}

int main(int argc, char **argv) {
    const char *sw = getenv("POPEK_CLI_SERVER");
    if (geteuid() != 0 || (sw && strcmp(sw, "off") == 0))
        python(argc, argv);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    const char *path = getenv("POPEK_CLI_SOCKET");
    strncpy(addr.sun_path, path && *path ? path : POPEK_SOCKET, sizeof addr.sun_path - 1);
    const char *where = addr.sun_path;
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0)
        python(argc, argv);
    /* only a root listener gets the environment and the terminal (client.py's rule) */
    long uid = peer_uid(sock);
    if (uid != 0) {
        fprintf(stderr, "popek: refused the command socket %s: it is served by uid %ld, not "
                "root; nothing was sent (unset POPEK_CLI_SOCKET, or set POPEK_CLI_SERVER=off)\n",
                where, uid);
        return 3;
    }
    if (send_request(sock, argc, argv) != 0)
        python(argc, argv);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = forward;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    int sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};

    char line[64];
    size_t used = 0;
    for (;;) {
        ssize_t n = recv(sock, line + used, sizeof line - 1 - used, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        used += (size_t)n;
        line[used] = '\0';
        char *nl;
        while ((nl = memchr(line, '\n', used))) {
            *nl = '\0';
            long value = number(line + 1);
            if (line[0] == 'P' && !child && value > 1) {
                child = (pid_t)value;  /* never 0, -1 or a group: a command of the server */
                for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
                    sigaction(sigs[i], &sa, NULL);
            } else if (line[0] == 'X' && child && value >= 0 && value <= 255) {
                return (int)value;
            } else if (!child) {  /* stale, refused or local: the Python client decides */
                close(sock);
                python(argc, argv);
            }
            size_t rest = used - (size_t)(nl + 1 - line);
            memmove(line, nl + 1, rest);
            used = rest;
        }
        if (used >= sizeof line - 1)
            used = 0;  /* a line longer than any the protocol has: drop it */
    }
    if (!child) {
        close(sock);
        python(argc, argv);
    }
    fprintf(stderr, "popek: the command ended without an exit code\n");
    return forwarded ? 128 + forwarded : 1;
}
