//! Protocol codecs and request rules. Nothing here does I/O or reads a clock: bytes and time come
//! in as arguments, decisions and encoded bytes come out. Everything is tested in memory.

pub mod capsule;
pub mod connect_udp;
pub mod h3;
pub mod sf;
pub mod target;
pub mod uri_template;
pub mod varint;
