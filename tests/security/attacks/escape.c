#define _GNU_SOURCE
/* Escape attempts run from inside a container by tests/security/test_container_escape.py.
 * Each subcommand tries one attack and prints "<attack>: ok" if the kernel allowed it
 * or "<attack>: <errno name>" if it refused.  Built static, so it runs in any rootfs. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

static int report(const char *what, long rc) {
    if (rc < 0) { printf("%s: %s\n", what, strerrorname_np(errno)); return 1; }
    printf("%s: ok\n", what);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    if (!strcmp(argv[1], "ptrace-pid")) {            /* attach to a pid given by number */
        pid_t pid = (pid_t)atoi(argv[2]);
        return report("ptrace-pid", ptrace(PTRACE_ATTACH, pid, 0, 0));
    }
    if (!strcmp(argv[1], "ptrace-child")) {          /* even one's own child */
        pid_t child = fork();
        if (child == 0) { pause(); _exit(0); }
        int rc = report("ptrace-child", ptrace(PTRACE_ATTACH, child, 0, 0));
        kill(child, SIGKILL); waitpid(child, 0, 0);
        return rc;
    }
    if (!strcmp(argv[1], "init-module")) {
        return report("init-module", syscall(SYS_init_module, "x", 1, ""));
    }
    if (!strcmp(argv[1], "open")) {                  /* open a path read/write */
        return report("open", open(argv[2], O_RDWR));
    }
    if (!strcmp(argv[1], "unshare-user")) {          /* nested user namespace */
        return report("unshare-user", syscall(SYS_unshare, 0x10000000));
    }
    return 2;
}
