//! The page's agents at run time: each with its socket and state; which one runs the
//! plan and fills the run view; adding, removing and remembering them (the rules are in
//! `fleet`).

use leptos::prelude::*;
use shared::plan::Plan;

use crate::socket::{self, AgentSocket};
use crate::state::AgentState;
use shared::fleet::{self, AgentAddress};

/// How often the page asks each agent for its devices, queue and newest runs.
pub const POLL_MS: i32 = 5_000;

#[derive(Clone)]
pub struct Agent {
    pub key: u32,
    pub address: AgentAddress,
    token: String,
    /// The agent that served the page (its token came in the page's address; it is not
    /// stored and cannot be removed).
    pub home: bool,
    pub state: AgentState,
    pub socket: AgentSocket,
}

#[derive(Clone, Copy)]
pub struct Fleet {
    pub agents: RwSignal<Vec<Agent>>,
    /// The agent runs go to and the run view and history show.
    pub selected: RwSignal<Option<u32>>,
    /// A plan a history row asked to open in the editor.
    pub open_plan: RwSignal<Option<Plan>>,
    next_key: StoredValue<u32>,
}

impl Fleet {
    /// The agent that served the page (when its address has a token) and the ones
    /// remembered in the browser's storage, each connecting.
    pub fn start() -> Fleet {
        let fleet = Fleet {
            agents: RwSignal::new(Vec::new()),
            selected: RwSignal::new(None),
            open_plan: RwSignal::new(None),
            next_key: StoredValue::new(0),
        };
        if let (Some(address), Some(token)) = (socket::home_address(), socket::token_from_location()) {
            fleet.join(address, token, true);
        }
        let saved =
            socket::local_storage().and_then(|s| s.get_item(fleet::STORAGE_KEY).ok().flatten()).unwrap_or_default();
        for (address, token) in fleet::decode_saved(&saved) {
            if fleet.check(&address).is_ok() {
                fleet.join(address, token, false);
            }
        }
        fleet
    }

    fn check(&self, address: &AgentAddress) -> Result<(), String> {
        let known: Vec<AgentAddress> = self.agents.with_untracked(|a| a.iter().map(|a| a.address.clone()).collect());
        fleet::check_new(&known, address)
    }

    fn join(&self, address: AgentAddress, token: String, home: bool) {
        let key = self.next_key.get_value();
        self.next_key.set_value(key + 1);
        let state = AgentState::new(self.open_plan);
        let socket = socket::connect(address.clone(), token.clone(), state);
        self.agents.update(|a| a.push(Agent { key, address, token, home, state, socket }));
        if self.selected.get_untracked().is_none() {
            self.selected.set(Some(key));
        }
    }

    /// Adds an agent as typed: its address (the URL it printed, which may carry the
    /// token) and a token (which wins over one in the URL). Errors name the field.
    pub fn add(&self, address: &str, token: &str) -> Result<(), String> {
        let (address, in_url) = fleet::parse_address(address)?;
        let token = match (token.trim().is_empty(), in_url) {
            (true, Some(t)) => t,
            _ => fleet::parse_token(token)?,
        };
        self.check(&address)?;
        self.join(address, token, false);
        self.save();
        Ok(())
    }

    /// Closes an added agent's socket and forgets it.
    pub fn remove(&self, key: u32) {
        let removed = self.agents.with_untracked(|a| a.iter().find(|a| a.key == key && !a.home).cloned());
        let Some(agent) = removed else { return };
        agent.socket.close();
        self.agents.update(|a| a.retain(|a| a.key != key));
        if self.selected.get_untracked() == Some(key) {
            self.selected.set(self.agents.with_untracked(|a| a.first().map(|a| a.key)));
        }
        self.save();
    }

    fn save(&self) {
        let list: Vec<(AgentAddress, String)> = self
            .agents
            .with_untracked(|a| a.iter().filter(|a| !a.home).map(|a| (a.address.clone(), a.token.clone())).collect());
        if let Some(s) = socket::local_storage() {
            let _ = s.set_item(fleet::STORAGE_KEY, &fleet::encode_saved(&list));
        }
    }

    /// The selected agent (tracked).
    pub fn current(&self) -> Option<Agent> {
        let key = self.selected.get()?;
        self.agents.with(|a| a.iter().find(|a| a.key == key).cloned())
    }

    /// Asks every agent for its devices, queue and newest runs; then every
    /// [`POLL_MS`].
    pub fn poll_forever(&self) {
        let fleet = *self;
        let tick = wasm_bindgen::closure::Closure::<dyn FnMut()>::new(move || {
            fleet.agents.with_untracked(|a| a.iter().for_each(|a| a.socket.poll(a.state)));
        });
        if let Some(w) = web_sys::window() {
            use wasm_bindgen::JsCast;
            let _ = w.set_interval_with_callback_and_timeout_and_arguments_0(tick.as_ref().unchecked_ref(), POLL_MS);
        }
        tick.forget();
    }
}
