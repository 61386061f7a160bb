//! zenith-local's REST API on 127.0.0.1: pgs, snapshots, storages and status, JSON in and
//! out. Every request carries `Authorization: Bearer <token>`, the token being the file
//! `api-token` of the repo (mode 0600); errors are `{"error": "..."}` with a fitting status.
//! The OpenAPI document is `docs/openapi.json`, also served at `/openapi.json`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, Request, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use super::console::Sessions;
use super::operations::Operations;
use super::pgs::Ops;
use crate::models::{
    Action, ActionReply, ConsoleLogin, ErrorReply, NewPg, NewSnapshot, OpError, StorageInfo,
};

/// The OpenAPI document, as committed under docs/.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

#[derive(Clone)]
struct Api {
    ops: Ops,
    token: Arc<String>,
    gate: Arc<Gate>,
    sessions: Arc<Sessions>,
    operations: Arc<Operations>,
}

/// Lets changes in while zenith-local serves, and none once it stops: [`Gate::close`]
/// refuses new ones and waits for those under way, so no checkout or snapshot is cut
/// short by the servers stopping under it.
#[derive(Default)]
pub struct Gate {
    closing: std::sync::atomic::AtomicBool,
    running: Arc<tokio::sync::RwLock<()>>,
}

impl Gate {
    async fn enter(&self) -> Result<tokio::sync::OwnedRwLockReadGuard<()>, OpError> {
        let closing = || self.closing.load(std::sync::atomic::Ordering::SeqCst);
        let refused = || {
            OpError::Unavailable(
                "zenith-local is stopping; run the command again after `zenith start`".into(),
            )
        };
        if closing() {
            return Err(refused());
        }
        let guard = Arc::clone(&self.running).read_owned().await;
        if closing() {
            return Err(refused());
        }
        Ok(guard)
    }

    /// Refuses new changes, then waits up to `wait` for those under way; false if some
    /// still run.
    pub async fn close(&self, wait: std::time::Duration) -> bool {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::timeout(wait, self.running.write())
            .await
            .is_ok()
    }
}

impl IntoResponse for OpError {
    fn into_response(self) -> Response {
        let status = match &self {
            OpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            OpError::NotFound(_) => StatusCode::NOT_FOUND,
            OpError::Conflict(_) => StatusCode::CONFLICT,
            OpError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            OpError::Storage(_)
            | OpError::Snapshot(_)
            | OpError::Compute(_)
            | OpError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error(status, &self.full_message())
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(ErrorReply {
            error: message.to_string(),
        }),
    )
        .into_response()
}

type Reply = Result<Response, OpError>;

fn ok(value: impl Serialize) -> Reply {
    Ok(Json(value).into_response())
}

/// A JSON body, or a 400 that says what is wrong with it.
fn body<T>(parsed: Result<Json<T>, JsonRejection>) -> Result<T, OpError> {
    parsed
        .map(|Json(t)| t)
        .map_err(|e| OpError::BadRequest(format!("the request body: {}", e.body_text())))
}

/// The routes, behind the bearer token; `gate` admits changes.
pub fn router(ops: Ops, token: String, gate: Arc<Gate>) -> Router {
    let api = Api {
        ops,
        token: Arc::new(token),
        gate,
        sessions: Arc::new(Sessions::default()),
        operations: Arc::new(Operations::default()),
    };
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/status", get(status))
        .route("/pgs", get(list_pgs).put(create_pg))
        .route("/pgs/{name}", get(show_pg).delete(destroy_pg))
        .route("/pgs/{name}/actions", post(pg_action))
        .route("/snapshots", get(list_snapshots).post(create_snapshot))
        .route(
            "/snapshots/{id}",
            get(show_snapshot).delete(delete_snapshot),
        )
        .route("/storages", get(list_storages).put(attach_storage))
        .route("/storages/{name}", get(show_storage).delete(detach_storage))
        .route("/console/codes", post(console_code))
        .route("/operations", get(operations))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such resource; see /openapi.json") })
        .layer(middleware::from_fn_with_state(api.clone(), authorize))
        .with_state(api)
}

/// Serves `router` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router).await
}

/// Runs an operation on a blocking thread, on the runtime but not as a task of it: the
/// operations' futures borrow across awaits in ways the compiler cannot prove `Send` for
/// every lifetime, which axum's handlers require.
async fn op<T, F, Fut>(api: &Api, f: F) -> Result<T, OpError>
where
    T: Send + 'static,
    F: FnOnce(Ops) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, OpError>>,
{
    let ops = api.ops.clone();
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || handle.block_on(f(ops)))
        .await
        .map_err(|e| OpError::Failed(format!("the operation failed: {e}")))?
}

/// [`op`] for a change, admitted by the gate and holding it to the end (even when the
/// client goes away, the operation runs on).
async fn change<T, F, Fut>(api: &Api, f: F) -> Result<T, OpError>
where
    T: Send + 'static,
    F: FnOnce(Ops) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, OpError>>,
{
    let admitted = api.gate.enter().await?;
    op(api, move |ops| async move {
        let result = f(ops).await;
        drop(admitted);
        result
    })
    .await
}

async fn authorize(State(api): State<Api>, request: Request<Body>, next: Next) -> Response {
    // The console's page, script and login need no token (see `console`); login codes
    // are for the token's holder only, so a session cannot renew itself.
    let path = request.uri().path();
    let codes = path == "/console/codes";
    if (path == "/console" || path.starts_with("/console/")) && !codes {
        return super::console::serve(&api.sessions, request).await;
    }
    if !codes && api.sessions.admits(request.headers()) {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .unwrap_or("");
    if !same(given.as_bytes(), api.token.as_bytes()) {
        return error(
            StatusCode::UNAUTHORIZED,
            "send Authorization: Bearer <token>, the token being the repo's api-token file",
        );
    }
    next.run(request).await
}

/// `POST /console/codes`: a one-time login link for the console.
async fn console_code(State(api): State<Api>, headers: axum::http::HeaderMap) -> Reply {
    let code = api.sessions.new_code().map_err(OpError::Failed)?;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    ok(ConsoleLogin {
        url: format!("http://{host}/console#code={code}"),
        expires_in_secs: super::console::CODE_LIFETIME.as_secs(),
    })
}

/// The token of an `Authorization: Bearer TOKEN` header; the scheme is case-insensitive
/// (RFC 7235).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

/// Compares in time that does not depend on where the first difference is.
pub(super) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn status(State(api): State<Api>) -> Reply {
    let value = op(&api, |ops| async move { ops.status().await }).await?;
    ok(value)
}

async fn list_pgs(State(api): State<Api>) -> Reply {
    ok(api.ops.list_pgs()?)
}

async fn operations(State(api): State<Api>) -> Reply {
    ok(api.operations.list())
}

async fn create_pg(State(api): State<Api>, new: Result<Json<NewPg>, JsonRejection>) -> Reply {
    let new = body(new)?;
    let (running, progress) = api.operations.start(format!("create pg {}", new.name));
    let pg = change(&api, move |ops| async move {
        running.outcome(ops.create_pg(&new, progress).await)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(pg)).into_response())
}

async fn show_pg(State(api): State<Api>, Path(name): Path<String>) -> Reply {
    ok(api.ops.show_pg(&name)?)
}

async fn destroy_pg(State(api): State<Api>, Path(name): Path<String>) -> Reply {
    change(&api, move |ops| async move { ops.destroy_pg(&name).await }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn pg_action(
    State(api): State<Api>,
    Path(name): Path<String>,
    action: Result<Json<Action>, JsonRejection>,
) -> Reply {
    let action = body(action)?;
    let tracked = matches!(action, Action::Checkout { .. })
        .then(|| api.operations.start(format!("checkout of {name}")));
    ok(change(&api, move |ops| async move {
        let (running, progress) = tracked.unzip();
        let result = async {
            Ok(match action {
                Action::Start {
                    is_replica,
                    primary,
                } => ActionReply::Pg(ops.start_pg(&name, is_replica, primary.as_deref()).await?),
                Action::Stop { immediate } => ActionReply::Pg(ops.stop_pg(&name, immediate).await?),
                Action::Promote => ActionReply::Pg(ops.promote_pg(&name).await?),
                Action::Checkout { snapshot, at } => ActionReply::Checkout(Box::new(
                    ops.checkout(
                        &name,
                        snapshot.as_deref(),
                        at.as_deref(),
                        progress.unwrap_or_default(),
                    )
                    .await?,
                )),
            })
        }
        .await;
        match &running {
            Some(running) => running.outcome(result),
            None => result,
        }
    })
    .await?)
}

async fn list_snapshots(State(api): State<Api>) -> Reply {
    let all = op(&api, |ops| async move {
        let all = ops.pageserver.list_snapshots().await?;
        Ok(all
            .iter()
            .map(|m| ops.pageserver.summary(m))
            .collect::<Vec<_>>())
    })
    .await?;
    ok(all)
}

async fn create_snapshot(
    State(api): State<Api>,
    new: Result<Json<NewSnapshot>, JsonRejection>,
) -> Reply {
    let new = body(new)?;
    let (running, progress) = api.operations.start(format!(
        "snapshot of {}",
        new.name.as_deref().unwrap_or("main")
    ));
    let m = change(&api, move |ops| async move {
        let m = running.outcome(
            ops.pageserver
                .create_snapshot(new.name.as_deref(), progress)
                .await,
        )?;
        Ok(ops.pageserver.summary(&m))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(m)).into_response())
}

async fn show_snapshot(State(api): State<Api>, Path(id): Path<String>) -> Reply {
    let m = op(&api, move |ops| async move {
        let m = ops.pageserver.show_snapshot(&id).await?;
        Ok(ops.pageserver.summary(&m))
    })
    .await?;
    ok(m)
}

async fn delete_snapshot(State(api): State<Api>, Path(id): Path<String>) -> Reply {
    ok(change(&api, move |ops| async move {
        ops.pageserver.delete_snapshot(&id).await
    })
    .await?)
}

async fn list_storages(State(api): State<Api>) -> Reply {
    ok(api.ops.pageserver.list_storages()?)
}

async fn show_storage(State(api): State<Api>, Path(name): Path<String>) -> Reply {
    ok(op(&api, move |ops| async move {
        ops.pageserver.show_storage(&name).await
    })
    .await?)
}

async fn attach_storage(
    State(api): State<Api>,
    new: Result<Json<StorageInfo>, JsonRejection>,
) -> Reply {
    let new = body(new)?;
    let _admitted = api.gate.enter().await?;
    let attached = api.ops.pageserver.attach_storage(&new.name, &new.url)?;
    Ok((StatusCode::CREATED, Json(attached)).into_response())
}

async fn detach_storage(State(api): State<Api>, Path(name): Path<String>) -> Reply {
    let _admitted = api.gate.enter().await?;
    api.ops.pageserver.detach_storage(&name)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
        assert!(!same(b"", b"a"));
    }

    #[test]
    fn the_openapi_document_is_json_and_names_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        for path in [
            "/pgs",
            "/pgs/{name}",
            "/pgs/{name}/actions",
            "/snapshots",
            "/snapshots/{id}",
            "/storages",
            "/storages/{name}",
            "/status",
            "/console/codes",
            "/operations",
        ] {
            assert!(doc["paths"][path].is_object(), "{path}");
        }
    }
}
