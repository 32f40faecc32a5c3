//! The lab's L402-paid model (`l402_model_url` = `http://127.0.0.1:PORT/v1`): the scripted model of
//! [`crate::model`], with every `POST /v1/chat/completions` paid by its own token (single use: spent by a
//! successful answer; a failed one leaves it usable). `GET /v1/models` stays free.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;

use super::{payment_receipt, Offer, Paywall};

/// 10 sats a call; a token is good for one successful call within 10 minutes.
pub const MODEL: Offer = Offer {
    single_use: true,
    ..Offer::new("lab-model", 10, 600)
};

pub fn router(paywall: Arc<Paywall>) -> Router {
    crate::model::router().layer(middleware::from_fn_with_state(paywall, pay_per_call))
}

async fn pay_per_call(
    State(paywall): State<Arc<Paywall>>,
    request: Request,
    next: Next,
) -> Response {
    let paid_route =
        request.method() == Method::POST && request.uri().path() == "/v1/chat/completions";
    if !paid_route {
        return next.run(request).await;
    }
    let paid = match paywall.check(&MODEL, request.headers()).await {
        Ok(paid) => paid,
        Err(challenge) => return challenge,
    };
    let mut response = next.run(request).await;
    let succeeded = response.status().is_success();
    paywall.finish(&paid, succeeded);
    if succeeded {
        response
            .headers_mut()
            .insert("payment-receipt", payment_receipt(&paid.payment_hash));
    }
    response
}
