pub mod dns;
pub mod drops;
pub mod flows;
pub mod linklocal;
pub mod packet;
pub mod recent;
pub mod tc;
pub mod udp;
