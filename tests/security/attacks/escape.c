#define _GNU_SOURCE
/* Escape attempts run from inside a container by tests/security/test_container_escape.py.
 * Each subcommand issues one system call and prints the call it issued, then " = ok" if
 * the kernel allowed it or " = <errno name>" (EPERM, EROFS...) if it refused, e.g.
 *     finit_module(3 "/share/mod.ko", "", 0x0) = EPERM
 * The errno is the one the system call itself returned, so a printed errno shows that
 * the call was issued.  Built static, so it runs in any rootfs.  The tests run some
 * subcommands on the host too (as root, in a throwaway namespace or directory) as the
 * positive control: there the same call succeeds, or is refused for another reason. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

static char call[512];

static int report(long rc) {
    if (rc < 0) { printf("%s = %s\n", call, strerrorname_np(errno)); return 1; }
    printf("%s = ok\n", call);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *cmd = argv[1];
    if (!strcmp(cmd, "ptrace-pid") && argc == 3) {    /* attach to a pid given by number */
        pid_t pid = (pid_t)atoi(argv[2]);
        snprintf(call, sizeof call, "ptrace(PTRACE_ATTACH, %d)", pid);
        return report(ptrace(PTRACE_ATTACH, pid, 0, 0));
    }
    if (!strcmp(cmd, "ptrace-child")) {                /* even one's own child */
        pid_t child = fork();
        if (child == 0) { pause(); _exit(0); }
        snprintf(call, sizeof call, "ptrace(PTRACE_ATTACH, child)");
        int rc = report(ptrace(PTRACE_ATTACH, child, 0, 0));
        kill(child, SIGKILL); waitpid(child, 0, 0);
        return rc;
    }
    if (!strcmp(cmd, "init-module")) {                 /* load a module from memory */
        snprintf(call, sizeof call, "init_module(\"x\", 1, \"\")");
        return report(syscall(SYS_init_module, "x", 1, ""));
    }
    if (!strcmp(cmd, "finit-module") && argc >= 3) {   /* load a module file: PATH [FLAGS] */
        unsigned long flags = argc > 3 ? strtoul(argv[3], 0, 0) : 0;
        int fd = open(argv[2], O_RDONLY | O_CLOEXEC);
        if (fd < 0) { snprintf(call, sizeof call, "open(\"%s\", O_RDONLY)", argv[2]); return report(-1); }
        snprintf(call, sizeof call, "finit_module(%d \"%s\", \"\", 0x%lx)", fd, argv[2], flags);
        return report(syscall(SYS_finit_module, fd, "", flags));
    }
    if (!strcmp(cmd, "mount-tmpfs") && argc == 3) {    /* mount a new file system */
        snprintf(call, sizeof call, "mount(\"none\", \"%s\", \"tmpfs\", 0, NULL)", argv[2]);
        return report(mount("none", argv[2], "tmpfs", 0, NULL));
    }
    if (!strcmp(cmd, "remount-rw") && argc == 3) {     /* make a read-only mount writable */
        /* MS_BIND with MS_REMOUNT changes only this mount's flags, never the superblock
         * (which the host shares), so the host control may run it in a throwaway namespace */
        snprintf(call, sizeof call, "mount(NULL, \"%s\", NULL, MS_REMOUNT|MS_BIND, NULL)", argv[2]);
        return report(mount(NULL, argv[2], NULL, MS_REMOUNT | MS_BIND, NULL));
    }
    if (!strcmp(cmd, "mknod") && argc == 6) {          /* mknod PATH c|b|p MAJOR MINOR */
        mode_t type = argv[3][0] == 'b' ? S_IFBLK : argv[3][0] == 'c' ? S_IFCHR : S_IFIFO;
        unsigned major_ = (unsigned)atoi(argv[4]), minor_ = (unsigned)atoi(argv[5]);
        snprintf(call, sizeof call, "mknod(\"%s\", %s|0600, makedev(%u, %u))", argv[2],
                 type == S_IFBLK ? "S_IFBLK" : type == S_IFCHR ? "S_IFCHR" : "S_IFIFO",
                 major_, minor_);
        return report(mknod(argv[2], type | 0600, makedev(major_, minor_)));
    }
    if (!strcmp(cmd, "open") && argc == 3) {           /* open a path read/write */
        snprintf(call, sizeof call, "open(\"%s\", O_RDWR)", argv[2]);
        return report(open(argv[2], O_RDWR));
    }
    if (!strcmp(cmd, "unshare-user")) {                /* nested user namespace */
        snprintf(call, sizeof call, "unshare(CLONE_NEWUSER)");
        return report(syscall(SYS_unshare, 0x10000000));
    }
    return 2;
}
