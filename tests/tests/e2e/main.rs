//! End-to-end tests: a real agent, real libtorch, a real WebSocket, a real browser.

mod agent_ws;
mod architecture;
mod browser;
mod cli;
mod hostile;
mod runs;
mod security;
mod trainer;
