//! The task record, its closed set of states and the allowed transitions.
//!
//! ```text
//!   enqueue ──► new ──claim──► running ──complete──► successful
//!               ▲ │               │ ├──fail, no retries left──► error
//!               │ │               │ └──cancel/reset flag, code returned──► aborted
//!               │ │               └──fail with retries left / lease lost──► new (run_at pushed out)
//!               │ └──cancel / reset / failed dependency──► aborted | error
//! ```
//! "waiting" (dependencies or run_at not yet met) is a derived view of `new`, never stored.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::Error;

pub type TaskId = i64;

/// Default priority: lower runs first.
pub const DEFAULT_PRIORITY: i64 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    New,
    Running,
    Successful,
    Error,
    Aborted,
}

impl State {
    pub const ALL: [State; 5] = [State::New, State::Running, State::Successful, State::Error, State::Aborted];

    pub fn as_str(self) -> &'static str {
        match self {
            State::New => "new",
            State::Running => "running",
            State::Successful => "successful",
            State::Error => "error",
            State::Aborted => "aborted",
        }
    }

    /// Terminal states never change again (only purge removes them).
    pub fn is_finished(self) -> bool {
        matches!(self, State::Successful | State::Error | State::Aborted)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = Error;
    fn from_str(s: &str) -> Result<State, Error> {
        State::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| {
            Error::invalid(
                "state",
                format!("unknown state {s:?} (expected new, running, successful, error or aborted)"),
            )
        })
    }
}

/// The host language whose dispatchers run a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runtime {
    Python,
    Ruby,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Python => "python",
            Runtime::Ruby => "ruby",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Runtime {
    type Err = Error;
    fn from_str(s: &str) -> Result<Runtime, Error> {
        match s {
            "python" => Ok(Runtime::Python),
            "ruby" => Ok(Runtime::Ruby),
            _ => Err(Error::invalid("runtime", format!("unknown runtime {s:?} (expected \"python\" or \"ruby\")"))),
        }
    }
}

/// What to enqueue. `args` is the stored JSON text `{"args": [...], "kwargs": {...}}` built by the
/// binding; the engine validates it but never re-serializes it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    pub runtime: Runtime,
    pub target: String,
    /// Ruby instance receivers: the JSON id handed to `Const.find`.
    pub receiver: Option<String>,
    pub args: String,
    pub queue: Option<String>,
    pub priority: i64,
    /// Absolute start time in microseconds since the epoch (UTC); `None` means now.
    pub run_at: Option<i64>,
    pub retries: u32,
    pub timeout: Option<Duration>,
    pub unique_key: Option<String>,
    /// A JSON object as text.
    pub meta: Option<String>,
    pub depends_on: Vec<TaskId>,
}

impl NewTask {
    pub fn new(runtime: Runtime, target: impl Into<String>) -> NewTask {
        NewTask {
            runtime,
            target: target.into(),
            receiver: None,
            args: r#"{"args":[],"kwargs":{}}"#.to_string(),
            queue: None,
            priority: DEFAULT_PRIORITY,
            run_at: None,
            retries: 0,
            timeout: None,
            unique_key: None,
            meta: None,
            depends_on: Vec::new(),
        }
    }

    pub fn args(mut self, json: impl Into<String>) -> Self {
        self.args = json.into();
        self
    }
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }
    pub fn priority(mut self, priority: i64) -> Self {
        self.priority = priority;
        self
    }
    pub fn run_at(mut self, micros: i64) -> Self {
        self.run_at = Some(micros);
        self
    }
    pub fn delay(mut self, delay: Duration) -> Self {
        self.run_at = Some(crate::clock::now_micros() + delay.as_micros() as i64);
        self
    }
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }
    pub fn meta(mut self, json: impl Into<String>) -> Self {
        self.meta = Some(json.into());
        self
    }
    pub fn depends_on(mut self, ids: impl IntoIterator<Item = TaskId>) -> Self {
        self.depends_on.extend(ids);
        self
    }
}

/// Result of an enqueue: the id, and whether an unfinished task already held the unique_key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    pub id: TaskId,
    pub existing: bool,
}

/// A stored failure: `{"class": ..., "message": ..., "backtrace": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorRecord {
    pub class: String,
    pub message: String,
    pub backtrace: Vec<String>,
}

impl ErrorRecord {
    pub fn new(class: impl Into<String>, message: impl Into<String>) -> ErrorRecord {
        ErrorRecord { class: class.into(), message: message.into(), backtrace: Vec::new() }
    }

    pub fn to_json(&self) -> String {
        serde_json::json!({"class": self.class, "message": self.message, "backtrace": self.backtrace}).to_string()
    }

    /// Lenient parse: rows written by hand may carry any JSON (or none) here.
    pub fn from_json(text: &str) -> ErrorRecord {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) => ErrorRecord {
                class: v.get("class").and_then(|c| c.as_str()).unwrap_or("Error").to_string(),
                message: v.get("message").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
                backtrace: v
                    .get("backtrace")
                    .and_then(|b| b.as_array())
                    .map(|a| a.iter().filter_map(|l| l.as_str().map(String::from)).collect())
                    .unwrap_or_default(),
            },
            Err(_) => ErrorRecord::new("Error", text),
        }
    }
}

/// One stored task, as any connection reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: TaskId,
    pub queue: Option<String>,
    pub runtime: Runtime,
    pub target: String,
    pub receiver: Option<String>,
    pub args: String,
    pub priority: i64,
    pub state: State,
    pub attempts: i64,
    pub retries: i64,
    pub lost: i64,
    pub run_at: i64,
    pub timeout: Option<Duration>,
    pub unique_key: Option<String>,
    pub meta: Option<String>,
    /// JSON text of the return value.
    pub result: Option<String>,
    pub error: Option<ErrorRecord>,
    /// Errors of earlier attempts, oldest first (JSON array text as stored).
    pub error_history: Vec<ErrorRecord>,
    pub message: Option<String>,
    pub perc_finished: Option<f64>,
    pub enqueued_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub dispatcher_id: Option<i64>,
    pub depends_on: Vec<TaskId>,
    /// A running task whose cancel (or reset) was requested.
    pub cancel_requested: bool,
}

/// What a host reports when the task's code returned.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Normal return; JSON text of the result (text that is not JSON is stored as a JSON string).
    Success(String),
    /// An exception (or a failure convention such as a bad rc).
    Failure(ErrorRecord),
}

impl Outcome {
    /// The outcome as the stores take it: a success's result is JSON. Done on the worker's
    /// thread, so the dispatcher's one writer thread never parses results.
    pub(crate) fn normalized(self) -> Outcome {
        match self {
            Outcome::Success(text) if serde_json::from_str::<serde_json::Value>(&text).is_err() => {
                Outcome::Success(serde_json::Value::String(text).to_string())
            }
            o => o,
        }
    }
}

/// Why a running task's cancellation flag was raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    Cancelled,
    Reset,
    Timeout,
}

/// Where a task stood after its outcome was stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Settled {
    Successful,
    /// Final failure (`error`), including a timeout with no retries left.
    Failed(ErrorRecord),
    /// Will run again at `run_at` (microseconds, UTC).
    Retrying {
        run_at: i64,
        error: ErrorRecord,
    },
    /// Cancelled or reset while it ran; stored as `aborted` whatever the code returned.
    Aborted(ErrorRecord),
    /// Handed back unstarted (see `Worker::release`): `new` again, no attempt counted.
    Released,
}

impl Settled {
    /// on_success / on_error callbacks run only after a terminal outcome.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, Settled::Retrying { .. } | Settled::Released)
    }
}

/// Filter for admin listings. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskFilter {
    pub states: Vec<State>,
    /// `Some(None)` selects tasks without a queue.
    pub queue: Option<Option<String>>,
    pub runtime: Option<Runtime>,
    /// Top-level meta keys that must equal the given JSON values (text, e.g. `"42"` or `"\"bob\""`).
    pub meta: Vec<(String, String)>,
    pub limit: Option<u32>,
    pub offset: Option<u32>,
    /// Newest first when true.
    pub descending: bool,
}

/// Counts of one queue (`None`: tasks without a queue), per state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub queue: Option<String>,
    pub paused: bool,
    pub new: u64,
    /// `new` tasks whose dependencies or run_at are not met yet (a subset of `new`).
    pub waiting: u64,
    pub running: u64,
    pub successful: u64,
    pub error: u64,
    pub aborted: u64,
}

/// A dispatcher's heartbeat row.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatcherInfo {
    pub id: i64,
    pub runtime: Runtime,
    pub name: String,
    pub host: String,
    pub pid: i64,
    pub workers: i64,
    pub queues: Option<String>,
    pub started_at: i64,
    pub heartbeat_at: i64,
    pub alive: bool,
    pub running: u64,
}
