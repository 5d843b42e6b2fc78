//! The endpoints: an axum router whose handlers parse and check requests, run the VM
//! side through the [`Dispatcher`], and shape the answers.
//!
//! Every error is JSON `{"fault_message": ...}`: 400 bad input, 404 unknown path, 405
//! wrong method, 408 body too slow, 409 no balloon, 413 body too large, 503 VMM stopping
//! or not answering.

use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, put};
use axum::Router;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::backend::{ApiError, VmBackend};
use super::dispatch::Dispatcher;
use super::metrics;
use super::model::{balloon_info, balloon_statistics, hint_status, policy_info, vm_info};
use ebb_api_model::units::{MIB, PAGES_PER_MIB};
use ebb_api_model::{
    BalloonStatsUpdate, BalloonUpdate, EmptyBody, Fault, HintStart, PolicyUpdate,
    MAX_POLICY_COOLDOWN_S,
};

/// Limits on what a request may send.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest request body accepted.
    pub max_bytes: usize,
    /// Time allowed to receive the body once the headers are in.
    pub timeout: Duration,
}

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    dispatcher: Dispatcher,
    limits: BodyLimits,
}

/// Every endpoint and method, as (path, method) pairs: the OpenAPI conformance test
/// checks this against the document.
pub const ENDPOINTS: &[(&str, &str)] = &[
    ("/balloon", "get"),
    ("/balloon", "patch"),
    ("/balloon/policy", "get"),
    ("/balloon/policy", "patch"),
    ("/balloon/statistics", "get"),
    ("/balloon/statistics", "patch"),
    ("/balloon/hinting/start", "patch"),
    ("/balloon/hinting/status", "get"),
    ("/balloon/hinting/stop", "patch"),
    ("/vm", "get"),
    ("/vm/shutdown", "put"),
    ("/vm/stop", "put"),
    ("/metrics", "get"),
];

/// The message `PUT /vm/stop` stops the VM with (ebb prints it on exit).
pub const STOP_REASON: &str = "API stop request";

/// The API's router.
pub fn router(dispatcher: Dispatcher, limits: BodyLimits) -> Router {
    Router::new()
        .route("/balloon", get(get_balloon).patch(patch_balloon))
        .route(
            "/balloon/statistics",
            get(get_balloon_stats).patch(patch_balloon_stats),
        )
        .route(
            "/balloon/policy",
            get(get_balloon_policy).patch(patch_balloon_policy),
        )
        .route("/balloon/hinting/start", patch(patch_hint_start))
        .route("/balloon/hinting/status", get(get_hint_status))
        .route("/balloon/hinting/stop", patch(patch_hint_stop))
        .route("/vm", get(get_vm))
        .route("/vm/shutdown", put(put_shutdown))
        .route("/vm/stop", put(put_stop))
        .route("/metrics", get(get_metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(AppState { dispatcher, limits })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(
            status,
            &Fault {
                fault_message: self.message,
            },
        )
    }
}

/// A JSON response.
pub fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(mut body) => {
            body.push(b'\n');
            let mut r = Response::new(Body::from(body));
            *r.status_mut() = status;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => {
            let mut r = Response::new(Body::from(format!(
                "{{\"fault_message\":\"cannot encode the response: {}\"}}\n",
                e.to_string().replace(['"', '\\'], "'")
            )));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        }
    }
}

/// A request body parsed as JSON `T`, read within the body limits.
pub struct JsonBody<T>(pub T);

/// Reads the whole body, refusing more than `limits.max_bytes` (without reading the
/// rest) and giving up after `limits.timeout`.
async fn read_body(req: Request, limits: BodyLimits) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::too_large(format!(
            "request body is larger than {} bytes",
            limits.max_bytes
        ))
    };
    if let Some(len) = req.headers().get(header::CONTENT_LENGTH) {
        let len = len
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| ApiError::bad_request("invalid Content-Length"))?;
        if len > limits.max_bytes as u64 {
            return Err(too_large());
        }
    }
    let body = Limited::new(req.into_body(), limits.max_bytes);
    match tokio::time::timeout(limits.timeout, body.collect()).await {
        Err(_) => Err(ApiError::timeout(format!(
            "request body not received within {} s",
            limits.timeout.as_secs_f64()
        ))),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {e}"
        ))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// Parses a JSON body strictly: unknown fields, wrong types and out-of-range numbers
/// are errors naming the field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "the request needs a JSON body".to_string(),
        ));
    }
    // serde would also build a struct from an array; the API takes objects only.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request(
            "invalid request body: expected a JSON object",
        ));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_body(req, state.limits).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// A body that may be absent; when present it must be `{}`.
struct OptionalEmptyBody;

impl FromRequest<AppState> for OptionalEmptyBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_body(req, state.limits).await?;
        if !bytes.iter().all(u8::is_ascii_whitespace) {
            parse_json::<EmptyBody>(&bytes)?;
        }
        Ok(OptionalEmptyBody)
    }
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

fn mib_to_pages(mib: u64) -> u64 {
    mib * PAGES_PER_MIB
}

async fn get_balloon(State(s): State<AppState>) -> Result<Response, ApiError> {
    let b = s
        .dispatcher
        .call(|vm| vm.balloon())
        .await?
        .ok_or_else(ApiError::no_balloon)?;
    Ok(json_response(StatusCode::OK, &balloon_info(&b)))
}

async fn patch_balloon(
    State(s): State<AppState>,
    JsonBody(update): JsonBody<BalloonUpdate>,
) -> Result<Response, ApiError> {
    s.dispatcher
        .call(move |vm| set_target(vm, update.amount_mib))
        .await??;
    Ok(no_content())
}

fn set_target(vm: &mut dyn VmBackend, amount_mib: u32) -> Result<(), ApiError> {
    let b = vm.balloon().ok_or_else(ApiError::no_balloon)?;
    if b.policy.as_ref().is_some_and(|p| p.enabled) {
        return Err(ApiError::conflict(
            "the automatic balloon policy sets the target; turn it off first \
             (PATCH /balloon/policy {\"enabled\": false})",
        ));
    }
    let memory_mib = b.guest_memory_bytes / MIB;
    if u64::from(amount_mib) > memory_mib {
        return Err(ApiError::bad_request(format!(
            "amount_mib {amount_mib} is larger than guest memory ({memory_mib} MiB)"
        )));
    }
    vm.set_balloon_target(mib_to_pages(amount_mib.into()))
}

async fn get_balloon_stats(State(s): State<AppState>) -> Result<Response, ApiError> {
    let b = s
        .dispatcher
        .call(|vm| vm.balloon())
        .await?
        .ok_or_else(ApiError::no_balloon)?;
    if !b.stats_enabled() {
        return Err(stats_disabled());
    }
    Ok(json_response(
        StatusCode::OK,
        &balloon_statistics(&b, SystemTime::now()),
    ))
}

fn stats_disabled() -> ApiError {
    ApiError::bad_request(
        "balloon statistics were not enabled at boot (start ebb with \
         --balloon ...,stats_interval=SECS); Ebb's balloon counters are in GET /metrics",
    )
}

async fn patch_balloon_stats(
    State(s): State<AppState>,
    JsonBody(update): JsonBody<BalloonStatsUpdate>,
) -> Result<Response, ApiError> {
    let secs = update.stats_polling_interval_s;
    s.dispatcher
        .call(move |vm| {
            let b = vm.balloon().ok_or_else(ApiError::no_balloon)?;
            if !b.stats_enabled() {
                return Err(stats_disabled());
            }
            if secs == 0 {
                return Err(ApiError::bad_request(
                    "stats_polling_interval_s must be at least 1: statistics cannot be \
                     turned off after boot",
                ));
            }
            vm.set_balloon_stats_interval(secs.into())
        })
        .await??;
    Ok(no_content())
}

fn no_policy() -> ApiError {
    ApiError::bad_request(
        "the balloon policy decides from the guest's statistics, which were not enabled \
         at boot (start ebb with --balloon ...,stats_interval=SECS)",
    )
}

async fn get_balloon_policy(State(s): State<AppState>) -> Result<Response, ApiError> {
    let b = s
        .dispatcher
        .call(|vm| vm.balloon())
        .await?
        .ok_or_else(ApiError::no_balloon)?;
    let policy = b.policy.ok_or_else(no_policy)?;
    Ok(json_response(StatusCode::OK, &policy_info(&policy)))
}

async fn patch_balloon_policy(
    State(s): State<AppState>,
    JsonBody(update): JsonBody<PolicyUpdate>,
) -> Result<Response, ApiError> {
    s.dispatcher
        .call(move |vm| {
            let b = vm.balloon().ok_or_else(ApiError::no_balloon)?;
            let policy = b.policy.ok_or_else(no_policy)?;
            let mut settings = policy.settings;
            let bytes = |mib: u64| {
                mib.checked_mul(MIB)
                    .ok_or_else(|| ApiError::bad_request(format!("{mib} MiB is too large")))
            };
            if let Some(v) = update.headroom_mib {
                settings.headroom = bytes(v)?;
            }
            if let Some(v) = update.min_mib {
                settings.min = bytes(v)?;
            }
            if let Some(v) = update.max_mib {
                settings.max = bytes(v)?;
            }
            if let Some(v) = update.step_mib {
                settings.step = bytes(v)?;
            }
            if let Some(v) = update.fault_rate_per_s {
                settings.fault_rate = v;
            }
            if let Some(v) = update.cooldown_s {
                if v > MAX_POLICY_COOLDOWN_S {
                    return Err(ApiError::bad_request(format!(
                        "cooldown_s {v} is above {MAX_POLICY_COOLDOWN_S}"
                    )));
                }
                settings.cooldown = Duration::from_secs(v);
            }
            if let Some(v) = update.trim {
                settings.trim = v;
            }
            settings
                .check(b.guest_memory_bytes)
                .map_err(ApiError::bad_request)?;
            vm.set_balloon_policy(settings, update.enabled.unwrap_or(policy.enabled))
        })
        .await??;
    Ok(no_content())
}

fn hinting_disabled() -> ApiError {
    ApiError::bad_request(
        "free page hinting was not enabled at boot (start ebb with --balloon \
         ...,free_page_hinting=on)",
    )
}

/// A body that may be absent (then `T::default()`), else a strict JSON object.
struct OptionalJson<T>(T);

impl<T: DeserializeOwned + Default> FromRequest<AppState> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_body(req, state.limits).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        parse_json(&bytes).map(OptionalJson)
    }
}

async fn patch_hint_start(
    State(s): State<AppState>,
    OptionalJson(start): OptionalJson<HintStart>,
) -> Result<Response, ApiError> {
    s.dispatcher
        .call(move |vm| {
            let b = vm.balloon().ok_or_else(ApiError::no_balloon)?;
            if !b.hinting_enabled() {
                return Err(hinting_disabled());
            }
            vm.start_hinting(start.acknowledge_on_stop)
        })
        .await??;
    Ok(no_content())
}

async fn get_hint_status(State(s): State<AppState>) -> Result<Response, ApiError> {
    let b = s
        .dispatcher
        .call(|vm| vm.balloon())
        .await?
        .ok_or_else(ApiError::no_balloon)?;
    if !b.hinting_enabled() {
        return Err(hinting_disabled());
    }
    Ok(json_response(StatusCode::OK, &hint_status(&b.hint)))
}

async fn patch_hint_stop(
    State(s): State<AppState>,
    _body: OptionalEmptyBody,
) -> Result<Response, ApiError> {
    s.dispatcher
        .call(|vm| {
            let b = vm.balloon().ok_or_else(ApiError::no_balloon)?;
            if !b.hinting_enabled() {
                return Err(hinting_disabled());
            }
            vm.stop_hinting()
        })
        .await??;
    Ok(no_content())
}

async fn get_vm(State(s): State<AppState>) -> Result<Response, ApiError> {
    let info = s
        .dispatcher
        .call(|vm| {
            let balloon = vm.balloon();
            vm_info(
                &vm.summary(),
                balloon.as_ref(),
                &vm.disks(),
                vm.memory_usage(),
            )
        })
        .await?;
    Ok(json_response(StatusCode::OK, &info))
}

async fn put_shutdown(
    State(s): State<AppState>,
    _body: OptionalEmptyBody,
) -> Result<Response, ApiError> {
    s.dispatcher.call(|vm| vm.press_power_button()).await??;
    Ok(no_content())
}

async fn put_stop(
    State(s): State<AppState>,
    _body: OptionalEmptyBody,
) -> Result<Response, ApiError> {
    s.dispatcher.call(|vm| vm.stop(STOP_REASON)).await?;
    Ok(no_content())
}

async fn get_metrics(State(s): State<AppState>) -> Result<Response, ApiError> {
    let doc = s
        .dispatcher
        .call(|vm| {
            let balloon = vm.balloon();
            metrics::render(
                &vm.summary(),
                vm.memory_usage(),
                &ebb_devices::faults::totals(),
                balloon.as_ref(),
                &vm.disks(),
            )
        })
        .await?;
    let mut r = Response::new(Body::from(doc));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    Ok(r)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no such resource: {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let allowed: Vec<String> = ENDPOINTS
        .iter()
        .filter(|(p, _)| *p == uri.path())
        .map(|(_, m)| m.to_ascii_uppercase())
        .collect();
    let allowed = allowed.join(", ");
    let mut r = ApiError::method_not_allowed(format!(
        "{method} is not allowed on {} (allowed: {allowed})",
        uri.path(),
    ))
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&allowed) {
        r.headers_mut().insert(header::ALLOW, v);
    }
    r
}
