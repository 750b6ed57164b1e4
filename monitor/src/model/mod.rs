//! What the agent decides, as plain code with no kernel in it: the instance's allowance,
//! EC2's tracking timeouts (and their defaults by instance type) and what the expiry pass keeps, how resolvers are labelled,
//! the link-local peak, the rankings of who is filling a table, and the alert rules'
//! thresholds.

pub mod allowance;
pub mod dns;
pub mod flows;
pub mod instance;
pub mod linklocal;
pub mod resolvers;
pub mod thresholds;
pub mod top;
