//! What can go wrong in an `ebb-ctl` command: the message to print and the exit status,
//! and the checks that turn an API answer into a result or a [`Failure`].

use serde::de::DeserializeOwned;

use crate::client::{ClientError, Response};

/// Exit status: the API answered with an error.
pub const EXIT_API_ERROR: i32 = 1;
/// Exit status: bad command line.
pub const EXIT_USAGE: i32 = 2;
/// Exit status: no usable answer from the socket.
pub const EXIT_NO_ANSWER: i32 = 3;

/// Something that went wrong, with what to print and the exit status.
#[derive(Debug)]
pub struct Failure {
    /// HTTP status, 0 when there was no HTTP answer.
    pub status: u16,
    /// One-line message.
    pub message: String,
    /// Exit status.
    pub exit: i32,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Self {
            status: 0,
            message: e.to_string(),
            exit: EXIT_NO_ANSWER,
        }
    }
}

/// The API refused the request: its status and fault message.
fn api_failure(r: &Response) -> Failure {
    Failure {
        status: r.status,
        message: r.fault_message(),
        exit: EXIT_API_ERROR,
    }
}

/// A failure without a usable answer: no connection, or an answer that makes no sense.
pub fn broken(what: impl Into<String>) -> Failure {
    Failure {
        status: 0,
        message: what.into(),
        exit: EXIT_NO_ANSWER,
    }
}

/// The answer when the API accepted the request, its fault message otherwise.
pub fn expect_ok(r: Response) -> Result<Response, Failure> {
    if r.is_success() {
        Ok(r)
    } else {
        Err(api_failure(&r))
    }
}

/// The answer's JSON body as `T`; an answer of another shape is a broken one.
pub fn decode<T: DeserializeOwned>(r: &Response) -> Result<T, Failure> {
    serde_json::from_slice(&r.body)
        .map_err(|e| broken(format!("unexpected answer from the API: {e}")))
}
