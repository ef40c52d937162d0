/*!
The API-key middleware of the generation routes.

Clients send `Authorization: Bearer <key>`. Each route group puts this layer on the routes
that need a key (every generation route, and every OpenAI route, as OpenAI's own API does);
liveness, readiness, model metadata and `/metrics` stay open, because probes and scrapers
carry no keys. A refused request gets 401 in its group's error shape.
*/

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use crate::api_keys::KeyIndex;
use crate::error::{ApiError, Wire};
use crate::state::AppState;

/// Middleware state: the app and the group's wire protocol (for the 401's shape).
#[derive(Clone)]
pub struct Guard {
    /// The app.
    pub state: AppState,
    /// The group's protocol.
    pub wire: Wire,
}

/// 401 without a valid `Authorization: Bearer` key (when keys are configured); otherwise
/// the request goes on with the [`KeyIndex`] of its key in its extensions.
pub async fn require_key(State(guard): State<Guard>, mut req: Request, next: Next) -> Response {
    let keys = &guard.state.config().api_keys;
    if keys.is_empty() {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match presented.and_then(|key| keys.find(key)) {
        Some(i) => {
            req.extensions_mut().insert(KeyIndex(i));
            next.run(req).await
        }
        None => ApiError::Unauthorized.into_response(guard.wire),
    }
}
