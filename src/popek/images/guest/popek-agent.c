/*
 * popek-agent: the guest agent of popek's minimal image.  It serves the host
 * over the virtio-serial port named org.popek.agent.0, one request at a time,
 * one ASCII line per message:
 *
 *   PING <id>                       -> PONG <id>
 *   EXEC <id> <b64 cmd> <b64 in|->  -> OUT <id> <b64 chunk>   stdout, any number
 *                                      ERR <id> <b64 chunk>   stderr, any number
 *                                      EXIT <id> <rc>         last
 *   PTY <id> <b64 cmd> <rows> <cols> -> STARTED <id>, then OUT <id> <b64 chunk> of the
 *                                      terminal, any number, and EXIT <id> <rc> last;
 *                                      meanwhile the host may send
 *                                        IN <id> <b64 keys>      the terminal's input
 *                                        WINCH <id> <rows> <cols> its new window size
 *   anything else                   -> ERROR <id> unknown-verb
 *
 * <id> is [A-Za-z0-9]{1,64}; base64 has no line wraps; "-" stands for empty.
 * A malformed request gets ERROR <id> bad-request (ERROR - bad-id, ERROR -
 * too-long for a request line over MAX_LINE bytes).  The command runs as
 * `sh -c CMD` in a session of its own, in /; its output is sent as it comes,
 * in chunks of at most CHUNK bytes (so no reply line is longer than about
 * 64 KiB), and EXIT follows once the command's shell has exited and what its
 * pipes then held has been sent (a background child that keeps them open
 * does not hold the reply).
 *
 * Idle costs nothing: while no host client is connected a read of the port
 * returns end-of-file at once and poll() reports POLLHUP at once, so neither
 * can wait for a client; a blocking write can: the virtio console driver
 * holds a writer until the host side opens the port.  So between clients the
 * agent sleeps in write(2) of one newline, which the next client receives
 * first (clients skip lines that are not answers to their own request).
 *
 * A client that leaves during an EXEC or a PTY (POLLHUP on the port) ends the
 * command: its whole session gets SIGKILL and nothing of its output reaches
 * the next client.
 *
 * PTY runs `sh -c CMD` as the leader of a new session whose controlling
 * terminal is a new pseudo-terminal of that size; the host sends nothing for
 * it before STARTED.  Input lines longer than MAX_INPUT bytes end the session
 * (ERROR <id> too-long); input the terminal cannot take yet waits, and while
 * MAX_INPUT bytes of it wait no more is read from the host.
 *
 * Built statically by popek's minimal image builder (images/agent.py).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define PORT_NAME "org.popek.agent.0"
#define MAX_LINE (8u << 20) /* a request: the command and up to 4 MiB of stdin, in base64 */
#define CHUNK (48u << 10)   /* raw bytes per OUT/ERR line: 64 KiB of base64 */
#define MAX_ID 64
#define MAX_INPUT (256u << 10) /* a line of terminal input from the host, and the backlog */

static int port = -1;
static char *inbuf;
static size_t inlen;

static void set_nonblock(int fd, int on) {
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        fcntl(fd, F_SETFL, on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK));
}

/* The /dev path of the port named PORT_NAME, or 0 when it is not there yet. */
static int find_port(char *out, size_t outlen) {
    glob_t g;
    int found = 0;
    if (glob("/sys/class/virtio-ports/*/name", 0, NULL, &g) != 0)
        return 0;
    for (size_t i = 0; i < g.gl_pathc && !found; i++) {
        char name[128] = {0};
        FILE *f = fopen(g.gl_pathv[i], "r");
        if (!f)
            continue;
        if (fgets(name, sizeof name, f)) {
            name[strcspn(name, "\n")] = 0;
            if (strcmp(name, PORT_NAME) == 0) {
                char *dir = strdup(g.gl_pathv[i]);
                *strrchr(dir, '/') = 0;
                snprintf(out, outlen, "/dev/%s", strrchr(dir, '/') + 1);
                free(dir);
                found = 1;
            }
        }
        fclose(f);
    }
    globfree(&g);
    return found;
}

static void announce_ready(void) {
    struct stat st;
    if (stat("/run/popek/ready", &st) == 0)
        return;
    int fd = open("/run/popek/ready", O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd >= 0)
        close(fd);
    int con = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
    if (con >= 0) {
        static const char msg[] = "popek-guest: ready\n";
        if (write(con, msg, sizeof msg - 1) < 0) { /* nothing to do */ }
        close(con);
    }
}

/* Sleep until a host client is connected (see the comment at the top). */
static void wait_for_host(void) {
    set_nonblock(port, 0);
    while (write(port, "\n", 1) < 0 && errno == EINTR) {}
    set_nonblock(port, 1);
}

/* Write all of buf to the port; 0 when done, -1 when the host left meanwhile. */
static int send_all(const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(port, buf, len);
        if (n > 0) {
            buf += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno != EAGAIN)
            return -1;
        struct pollfd p = {port, POLLOUT, 0};
        if (poll(&p, 1, -1) < 0 && errno != EINTR)
            return -1;
        if ((p.revents & (POLLHUP | POLLERR)) && !(p.revents & POLLOUT))
            return -1;
    }
    return 0;
}

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static size_t b64_encode(const unsigned char *in, size_t len, char *out) {
    size_t o = 0, i = 0;
    for (; i + 2 < len; i += 3) {
        unsigned v = (unsigned)in[i] << 16 | (unsigned)in[i + 1] << 8 | in[i + 2];
        out[o++] = B64[v >> 18];
        out[o++] = B64[(v >> 12) & 63];
        out[o++] = B64[(v >> 6) & 63];
        out[o++] = B64[v & 63];
    }
    if (i < len) {
        unsigned v = (unsigned)in[i] << 16 | (i + 1 < len ? (unsigned)in[i + 1] << 8 : 0);
        out[o++] = B64[v >> 18];
        out[o++] = B64[(v >> 12) & 63];
        out[o++] = i + 1 < len ? B64[(v >> 6) & 63] : '=';
        out[o++] = '=';
    }
    return o;
}

static int b64_value(char c) {
    const char *p = c ? strchr(B64, c) : NULL;
    return p ? (int)(p - B64) : -1;
}

/* Decode "-" or strict base64 in place into out; return the length or -1. */
static long b64_decode(const char *in, unsigned char *out) {
    size_t len = strlen(in), o = 0;
    if (strcmp(in, "-") == 0)
        return 0;
    if (len == 0 || len % 4 != 0)
        return -1;
    for (size_t i = 0; i < len; i += 4) {
        int a = b64_value(in[i]), b = b64_value(in[i + 1]);
        int last = i + 4 == len;
        int pad2 = last && in[i + 2] == '=' && in[i + 3] == '=';
        int pad1 = last && !pad2 && in[i + 3] == '=';
        int c = pad2 ? 0 : b64_value(in[i + 2]), d = (pad1 || pad2) ? 0 : b64_value(in[i + 3]);
        if (a < 0 || b < 0 || c < 0 || d < 0)
            return -1;
        unsigned v = (unsigned)a << 18 | (unsigned)b << 12 | (unsigned)c << 6 | (unsigned)d;
        out[o++] = (unsigned char)(v >> 16);
        if (!pad2)
            out[o++] = (unsigned char)(v >> 8);
        if (!pad1 && !pad2)
            out[o++] = (unsigned char)v;
    }
    return (long)o;
}

static int reply(const char *fmt, const char *id, const char *arg) {
    char line[256];
    int n = snprintf(line, sizeof line, fmt, id, arg);
    return send_all(line, (size_t)n);
}

/* Send one OUT/ERR line with data; -1 when the host left. */
static int send_chunk(const char *tag, const char *id, const unsigned char *data, size_t len) {
    static char line[8 + MAX_ID + 4 * ((CHUNK + 2) / 3) + 2];
    int head = snprintf(line, sizeof line, "%s %s ", tag, id);
    size_t n = (size_t)head + b64_encode(data, len, line + head);
    line[n++] = '\n';
    return send_all(line, n);
}

static void kill_session(pid_t pid) {
    kill(-pid, SIGKILL);
    kill(pid, SIGKILL);
}

/* Send one chunk the pipe holds now (``drain``: up to 64 chunks, what it then holds). */
static int forward(int *fd, const char *tag, const char *id, int drain) {
    static unsigned char buf[CHUNK];
    for (int chunks = 0; chunks < 64; chunks++) {
        ssize_t n = read(*fd, buf, sizeof buf);
        if (n > 0) {
            if (send_chunk(tag, id, buf, (size_t)n) < 0)
                return -1;
            if (!drain)
                return 0;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0 || errno != EAGAIN) {
            close(*fd);
            *fd = -1;
        }
        return 0;
    }
    return 0;
}

/* Reap the command (unless ``exited`` did) and, unless the host left, send EXIT with its
 * exit code (128 + the signal that ended it). */
static void finish(const char *id, pid_t pid, int status, int exited, int gone) {
    if (!exited && waitpid(pid, &status, 0) != pid)
        status = 0;
    if (!gone) {
        char rc[16];
        snprintf(rc, sizeof rc, "%d", WIFEXITED(status) ? WEXITSTATUS(status)
                                                        : 128 + WTERMSIG(status));
        reply("EXIT %s %s\n", id, rc);
    }
}

static void do_exec(const char *id, const char *cmd64, const char *in64) {
    unsigned char *cmd = malloc(strlen(cmd64) + 1), *in = malloc(strlen(in64) + 1);
    long cmdlen = cmd ? b64_decode(cmd64, cmd) : -1;
    long inlen_ = in ? b64_decode(in64, in) : -1;
    int pin[2], pout[2], perr[2];
    if (cmdlen <= 0 || inlen_ < 0 || memchr(cmd, 0, (size_t)cmdlen)) {
        reply("ERROR %s bad-request%s\n", id, "");
        goto out;
    }
    cmd[cmdlen] = 0;
    if (pipe2(pin, O_CLOEXEC) || pipe2(pout, O_CLOEXEC) || pipe2(perr, O_CLOEXEC)) {
        reply("ERROR %s no-resources%s\n", id, "");
        goto out;
    }
    pid_t pid = fork();
    if (pid < 0) {
        reply("ERROR %s no-resources%s\n", id, "");
        close(pin[0]); close(pin[1]); close(pout[0]); close(pout[1]);
        close(perr[0]); close(perr[1]);
        goto out;
    }
    if (pid == 0) {
        setsid();
        signal(SIGPIPE, SIG_DFL);
        dup2(pin[0], 0);
        dup2(pout[1], 1);
        dup2(perr[1], 2);
        if (chdir("/") != 0) { /* / always exists */ }
        execl("/bin/sh", "sh", "-c", (char *)cmd, (char *)NULL);
        _exit(127);
    }
    close(pin[0]);
    close(pout[1]);
    close(perr[1]);
    int fin = pin[1], fout = pout[0], ferr = perr[0];
    set_nonblock(fin, 1);
    set_nonblock(fout, 1);
    set_nonblock(ferr, 1);
    size_t sent_in = 0;
    if (inlen_ == 0) {
        close(fin);
        fin = -1;
    }
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    int status = 0, exited = 0, gone = 0;
    while (!gone && (fout >= 0 || ferr >= 0) && !exited) {
        struct pollfd p[5] = {
            {port, 0, 0}, {fout, POLLIN, 0}, {ferr, POLLIN, 0}, {fin, POLLOUT, 0}, {pidfd, POLLIN, 0},
        };
        if (poll(p, 5, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (p[0].revents & (POLLHUP | POLLERR))
            gone = 1;
        if (!gone && p[1].revents && forward(&fout, "OUT", id, 0) < 0)
            gone = 1;
        if (!gone && p[2].revents && forward(&ferr, "ERR", id, 0) < 0)
            gone = 1;
        if (fin >= 0 && p[3].revents) {
            ssize_t n = write(fin, in + sent_in, (size_t)inlen_ - sent_in);
            if (n > 0)
                sent_in += (size_t)n;
            if ((n < 0 && errno != EAGAIN && errno != EINTR) || sent_in == (size_t)inlen_) {
                close(fin);
                fin = -1;
            }
        }
        if (pidfd >= 0 && p[4].revents && waitpid(pid, &status, WNOHANG) == pid)
            exited = 1;
    }
    if (gone) {
        kill_session(pid);
    } else {
        /* the shell has exited (or closed both pipes): send what the pipes hold */
        if (fout >= 0 && forward(&fout, "OUT", id, 1) < 0)
            gone = 1;
        if (!gone && ferr >= 0 && forward(&ferr, "ERR", id, 1) < 0)
            gone = 1;
    }
    finish(id, pid, status, exited, gone);
    if (fin >= 0) close(fin);
    if (fout >= 0) close(fout);
    if (ferr >= 0) close(ferr);
    if (pidfd >= 0) close(pidfd);
out:
    free(cmd);
    free(in);
}

/* A window size from two decimal fields of 1 to 4 digits; 0 when malformed. */
static int parse_size(const char *rows, const char *cols, struct winsize *ws) {
    const char *f[2] = {rows, cols};
    unsigned v[2];
    for (int i = 0; i < 2; i++) {
        size_t len = strlen(f[i]);
        if (len == 0 || len > 4 || strspn(f[i], "0123456789") != len)
            return 0;
        v[i] = (unsigned)atoi(f[i]);
        if (v[i] == 0)
            return 0;
    }
    memset(ws, 0, sizeof *ws);
    ws->ws_row = (unsigned short)v[0];
    ws->ws_col = (unsigned short)v[1];
    return 1;
}

/* One line of the host during a PTY session: 0 to go on, -1 to end it (malformed input). */
static int pty_input(char *line, const char *id, int master, unsigned char *pending,
                     size_t *npending) {
    char *fields[5] = {0};
    int n = 0;
    for (char *tok = strtok(line, " \r"); tok && n < 5; tok = strtok(NULL, " \r"))
        fields[n++] = tok;
    if (n < 2 || strcmp(fields[1], id) != 0)
        return 0; /* an empty line, or not for this session */
    if (strcmp(fields[0], "IN") == 0 && n == 3) {
        long got = b64_decode(fields[2], pending + *npending);
        if (got < 0)
            return -1;
        *npending += (size_t)got;
        return 0;
    }
    if (strcmp(fields[0], "WINCH") == 0 && n == 4) {
        struct winsize ws;
        if (!parse_size(fields[2], fields[3], &ws))
            return -1;
        ioctl(master, TIOCSWINSZ, &ws); /* the kernel signals the foreground group */
        return 0;
    }
    return -1;
}

static void do_pty(const char *id, const char *cmd64, const char *rows, const char *cols) {
    unsigned char *cmd = malloc(strlen(cmd64) + 1);
    long cmdlen = cmd ? b64_decode(cmd64, cmd) : -1;
    struct winsize ws;
    /* the input backlog, and the host's lines not yet whole (one line decodes to less) */
    static unsigned char pending[MAX_INPUT];
    static char lines[MAX_INPUT + 1];
    size_t npending = 0, nlines = 0;
    int master = -1;
    if (cmdlen <= 0 || memchr(cmd, 0, (size_t)cmdlen) || !parse_size(rows, cols, &ws)) {
        reply("ERROR %s bad-request%s\n", id, "");
        goto out;
    }
    cmd[cmdlen] = 0;
    master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    char *slave_name = master >= 0 && grantpt(master) == 0 && unlockpt(master) == 0
                           ? ptsname(master) : NULL;
    if (!slave_name || ioctl(master, TIOCSWINSZ, &ws) != 0) {
        reply("ERROR %s no-resources%s\n", id, "");
        goto out;
    }
    pid_t pid = fork();
    if (pid < 0) {
        reply("ERROR %s no-resources%s\n", id, "");
        goto out;
    }
    if (pid == 0) {
        setsid();
        int slave = open(slave_name, O_RDWR); /* a session leader's first terminal: its own */
        if (slave < 0 || ioctl(slave, TIOCSCTTY, 0) != 0)
            _exit(126);
        signal(SIGPIPE, SIG_DFL);
        dup2(slave, 0);
        dup2(slave, 1);
        dup2(slave, 2);
        if (slave > 2)
            close(slave);
        setenv("TERM", "xterm-256color", 0);
        if (chdir("/") != 0) { /* / always exists */ }
        execl("/bin/sh", "sh", "-c", (char *)cmd, (char *)NULL);
        _exit(127);
    }
    set_nonblock(master, 1);
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    int status = 0, exited = 0, gone = reply("STARTED %s%s\n", id, "") < 0;
    while (!gone && !exited) {
        struct pollfd p[3] = {
            {port, npending < MAX_INPUT / 2 ? POLLIN : 0, 0},
            {master, POLLIN | (npending ? POLLOUT : 0), 0},
            {pidfd, POLLIN, 0},
        };
        if (poll(p, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if ((p[0].revents & (POLLHUP | POLLERR)) && !(p[0].revents & POLLIN)) {
            gone = 1;
            break;
        }
        if (p[0].revents & POLLIN) {
            ssize_t got = read(port, lines + nlines, MAX_INPUT - nlines);
            if (got == 0) {
                gone = 1;
                break;
            }
            if (got > 0)
                nlines += (size_t)got;
            char *start = lines, *nl;
            while (!gone && (nl = memchr(start, '\n', nlines - (size_t)(start - lines)))) {
                *nl = 0;
                /* a line decodes to at most 3/4 of its length: it fits if half is free */
                if (npending + (size_t)(nl - start) > MAX_INPUT ||
                    pty_input(start, id, master, pending, &npending) < 0) {
                    reply("ERROR %s bad-request%s\n", id, "");
                    gone = 1;
                }
                start = nl + 1;
            }
            nlines -= (size_t)(start - lines);
            memmove(lines, start, nlines);
            if (!gone && nlines == MAX_INPUT) {
                reply("ERROR %s too-long%s\n", id, "");
                gone = 1;
            }
        }
        if (!gone && npending && (p[1].revents & POLLOUT)) {
            ssize_t n = write(master, pending, npending);
            if (n > 0) {
                memmove(pending, pending + n, npending - (size_t)n);
                npending -= (size_t)n;
            }
        }
        if (!gone && (p[1].revents & (POLLIN | POLLHUP)))
            if (forward(&master, "OUT", id, 0) < 0)
                gone = 1;
        if (pidfd >= 0 && (p[2].revents & POLLIN) && waitpid(pid, &status, WNOHANG) == pid)
            exited = 1;
        if (master < 0 && !exited) { /* every holder of the terminal closed it */
            if (waitpid(pid, &status, 0) == pid)
                exited = 1;
            break;
        }
    }
    if (gone) {
        kill_session(pid);
    } else if (master >= 0 && forward(&master, "OUT", id, 1) < 0) {
        gone = 1; /* what the terminal held when the shell exited */
    }
    kill(-pid, SIGHUP); /* what the shell left on its terminal, as a terminal's hang-up does */
    finish(id, pid, status, exited, gone);
    if (pidfd >= 0) close(pidfd);
out:
    if (master >= 0) close(master);
    free(cmd);
}

static void handle(char *line) {
    char *fields[6] = {0};
    int n = 0;
    for (char *tok = strtok(line, " \r"); tok && n < 6; tok = strtok(NULL, " \r"))
        fields[n++] = tok;
    if (n == 0)
        return;
    const char *verb = fields[0], *id = fields[1];
    if (!id || strlen(id) > MAX_ID || strspn(id, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnop"
                                              "qrstuvwxyz0123456789") != strlen(id)) {
        send_all("ERROR - bad-id\n", 15);
        return;
    }
    if (strcmp(verb, "PING") == 0)
        reply("PONG %s%s\n", id, "");
    else if (strcmp(verb, "EXEC") == 0) {
        if (n != 4)
            reply("ERROR %s bad-request%s\n", id, "");
        else
            do_exec(id, fields[2], fields[3]);
    } else if (strcmp(verb, "PTY") == 0) {
        if (n != 5)
            reply("ERROR %s bad-request%s\n", id, "");
        else
            do_pty(id, fields[2], fields[3], fields[4]);
    } else
        reply("ERROR %s unknown-verb%s\n", id, "");
}

/* Serve requests until the client leaves (end-of-file or POLLHUP). */
static void serve_client(void) {
    size_t scanned = 0;
    int skipping = 0; /* inside a line longer than MAX_LINE */
    inlen = 0;
    for (;;) {
        char *nl = memchr(inbuf + scanned, '\n', inlen - scanned);
        if (nl) {
            *nl = 0;
            size_t used = (size_t)(nl - inbuf) + 1;
            if (skipping)
                send_all("ERROR - too-long\n", 17);
            else
                handle(inbuf);
            skipping = 0;
            memmove(inbuf, inbuf + used, inlen - used);
            inlen -= used;
            scanned = 0;
            continue;
        }
        scanned = inlen;
        if (inlen == MAX_LINE) {
            skipping = 1;
            inlen = scanned = 0;
        }
        struct pollfd p = {port, POLLIN, 0};
        if (poll(&p, 1, -1) < 0 && errno != EINTR)
            return;
        if (!(p.revents & POLLIN) && (p.revents & (POLLHUP | POLLERR)))
            return; /* a line cut short by the client leaving is dropped */
        ssize_t got = read(port, inbuf + inlen, MAX_LINE - inlen);
        if (got == 0)
            return;
        if (got > 0)
            inlen += (size_t)got;
        else if (errno != EAGAIN && errno != EINTR)
            return;
    }
}

int main(void) {
    char dev[300];
    signal(SIGPIPE, SIG_IGN);
    mkdir("/run/popek", 0755);
    FILE *pidf = fopen("/run/popek/agent.pid", "w");
    if (pidf) {
        fprintf(pidf, "%d\n", (int)getpid());
        fclose(pidf);
    }
    for (int waited = 0;; waited++) {
        if (find_port(dev, sizeof dev) && (port = open(dev, O_RDWR | O_CLOEXEC)) >= 0)
            break;
        if (waited == 50) {
            int con = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
            if (con >= 0) {
                dprintf(con, "popek-agent: waiting for virtio-serial port %s\n", PORT_NAME);
                close(con);
            }
        }
        usleep(200000); /* boot only: the port appears once its driver is loaded */
    }
    inbuf = malloc(MAX_LINE);
    if (!inbuf)
        return 1;
    set_nonblock(port, 1);
    announce_ready();
    for (;;) {
        serve_client();
        wait_for_host();
    }
}
