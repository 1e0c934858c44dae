//! Running a program the way a locked-down container would: with a seccomp filter that refuses
//! the io_uring system calls (as Docker's default profile and many Kubernetes runtimes do).
//! Used by the tests that check the relay falls back to recvmmsg/sendmmsg there, and available
//! to operators who want to rehearse the same.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// io_uring_setup, io_uring_enter, io_uring_register: the same numbers on every architecture.
const IO_URING_SYSCALLS: [u32; 3] = [425, 426, 427];

/// Makes `cmd` start with a seccomp filter under which every io_uring system call fails with
/// EPERM (and `no_new_privs` set, which installing a filter without CAP_SYS_ADMIN requires).
pub fn forbid_io_uring(cmd: &mut Command) -> &mut Command {
    // The BPF program: load the syscall number; EPERM for the three io_uring calls; allow the
    // rest. Built before fork, so the child only makes two system calls.
    let ld = |k: u32| libc::sock_filter {
        code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf: 0,
        k,
    };
    let ret = |k: u32| libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let program: Vec<libc::sock_filter> = vec![
        ld(0), // seccomp_data.nr
        jeq(IO_URING_SYSCALLS[0], 3),
        jeq(IO_URING_SYSCALLS[1], 2),
        jeq(IO_URING_SYSCALLS[2], 1),
        ret(libc::SECCOMP_RET_ALLOW),
        ret(libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
    ];
    let hook = move || -> io::Result<()> {
        let prog = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `prog` points at `program`, alive for the call; the kernel copies the filter.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec and only calls prctl (async-signal-safe), on
    // memory allocated before the fork; it allocates nothing and takes no lock.
    unsafe { cmd.pre_exec(hook) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forbidden_child_falls_back_to_mmsg() {
        // The relay binary is not built for unit tests; the test binary itself serves as the
        // child, running the probe test below in a forbidden process.
        let exe = std::env::current_exe().unwrap();
        let out = forbid_io_uring(
            Command::new(exe)
                .args([
                    "--exact",
                    "io::sandbox::tests::probe_in_child",
                    "--nocapture",
                ])
                .env("MASQUE_SANDBOX_CHILD", "1"),
        )
        .output();
        let out = match out {
            Ok(out) => out,
            // A kernel built without seccomp filters cannot play the container here.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => panic!("{e}"),
        };
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains("io_uring_setup: Operation not permitted"),
            "{text}"
        );
    }

    #[test]
    fn probe_in_child() {
        if std::env::var_os("MASQUE_SANDBOX_CHILD").is_none() {
            return;
        }
        let why = crate::io::dgram::select(crate::io::dgram::Choice::Auto).unwrap();
        assert_eq!(why.backend, crate::io::dgram::Backend::Mmsg);
        println!("probe: {}", why.reason);
    }
}
