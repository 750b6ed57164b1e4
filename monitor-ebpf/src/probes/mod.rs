pub mod drops;
