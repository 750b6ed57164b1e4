//! The lock-free tables the programs share with the agent, each a module of its own
//! (the agent's side of each is in its `tables/`): what is in a table and how a slot is
//! claimed lives here, what a packet means lives in `probes/`.

pub mod clients;
pub mod flowsets;
pub mod pending;
pub mod room;
