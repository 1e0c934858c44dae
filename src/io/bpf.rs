//! Steering QUIC packets to the worker that owns their connection.
//!
//! Every worker binds its own UDP socket on the same port with SO_REUSEPORT. The kernel's default
//! choice among them hashes the 4-tuple, which breaks when a client's address changes (NAT
//! rebinding, migration): the packets of one connection would reach a worker that does not know
//! it. The relay's connection IDs carry the worker index in their first byte (see
//! `transport::quic::WorkerCid`), and this classic BPF program, attached to the reuseport group,
//! picks the socket from that byte:
//!
//! ```text
//! byte 0 of the UDP payload: 1xxxxxxx long header -> DCID starts at byte 6
//!                            0xxxxxxx short header -> DCID starts at byte 1
//! socket index = DCID[0] % workers
//! ```
//!
//! A client's first Initial packets carry a DCID it chose at random; the same rule sends them all
//! to one worker (a consistent hash), and once the client uses the relay's own CIDs the rule
//! finds the worker that issued them. Socket index i is the i-th socket bound to the group, so
//! workers bind in index order.

use std::io;
use std::os::fd::AsRawFd;

const BPF_LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
const BPF_JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
const BPF_JA: u16 = 0x05; // BPF_JMP | BPF_JA
const BPF_MOD_K: u16 = 0x94; // BPF_ALU | BPF_MOD | BPF_K
const BPF_RET_A: u16 = 0x16; // BPF_RET | BPF_A

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The steering program for `workers` sockets.
pub fn cid_steering_program(workers: u32) -> Vec<libc::sock_filter> {
    vec![
        insn(BPF_LD_B_ABS, 0, 0, 0),    // 0: A = payload[0]
        insn(BPF_JSET_K, 0, 2, 0x80),   // 1: long header? go on : skip to 4
        insn(BPF_LD_B_ABS, 0, 0, 6),    // 2: A = DCID[0] of a long header
        insn(BPF_JA, 0, 0, 1),          // 3: skip to 5
        insn(BPF_LD_B_ABS, 0, 0, 1),    // 4: A = DCID[0] of a short header
        insn(BPF_MOD_K, 0, 0, workers), // 5: A %= workers
        insn(BPF_RET_A, 0, 0, 0),       // 6: socket index = A
    ]
}

/// Attaches the steering program to the reuseport group `sock` belongs to.
pub fn attach_cid_steering(sock: &impl AsRawFd, workers: u32) -> io::Result<()> {
    if workers == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no workers"));
    }
    let mut prog = cid_steering_program(workers);
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `prog`, which outlives the call; the kernel copies the program
    // during setsockopt and keeps no pointer to our memory; optlen is the size of `fprog`.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny interpreter for the instructions the program uses, so the program's logic is
    /// tested without a kernel.
    fn run(prog: &[libc::sock_filter], pkt: &[u8]) -> u32 {
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                BPF_LD_B_ABS => match pkt.get(i.k as usize) {
                    Some(b) => a = u32::from(*b),
                    None => return 0, // the kernel aborts the program: index 0
                },
                BPF_JSET_K => pc += usize::from(if a & i.k != 0 { i.jt } else { i.jf }),
                BPF_JA => pc += i.k as usize,
                BPF_MOD_K => a %= i.k,
                BPF_RET_A => return a,
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn short_and_long_headers_pick_the_cid_worker() {
        let prog = cid_steering_program(4);
        // Short header: flags, then DCID (first byte 6 -> worker 2).
        assert_eq!(run(&prog, &[0x40, 6, 1, 2, 3, 4, 5, 6, 7, 0xaa]), 2);
        // Long header: flags, version(4), DCID len, DCID (first byte 7 -> worker 3).
        assert_eq!(
            run(&prog, &[0xc0, 0, 0, 0, 1, 8, 7, 0, 0, 0, 0, 0, 0, 0]),
            3
        );
        assert_eq!(run(&prog, &[0xc0, 0, 0, 0, 1, 8, 8]), 0);
        // Too short to read the DCID: index 0.
        assert_eq!(run(&prog, &[0x40]), 0);
    }

    #[test]
    fn attaches_to_a_reuseport_socket() {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.set_reuse_port(true).unwrap();
        s.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        attach_cid_steering(&s, 2).unwrap();
    }
}
