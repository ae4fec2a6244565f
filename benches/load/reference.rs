//! The reference server: the least an order endpoint can do. It parses the
//! JSON, mints a UUID, inserts into a map and answers JSON: no validation
//! beyond the types, no logging, no metrics, no queue. The service's figures
//! are read as ratios to this one's, measured with the same client in the
//! same run.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Deserialize)]
struct NewOrder {
    customer_id: String,
    amount: i64,
    currency: String,
}

#[derive(Clone, Serialize)]
struct Order {
    id: Uuid,
    customer_id: String,
    amount: i64,
    currency: String,
    status: &'static str,
}

type Orders = Arc<RwLock<HashMap<Uuid, Order>>>;

async fn create(State(orders): State<Orders>, Json(new): Json<NewOrder>) -> Response {
    let order = Order {
        id: Uuid::new_v4(),
        customer_id: new.customer_id,
        amount: new.amount,
        currency: new.currency,
        status: "pending",
    };
    orders.write().unwrap().insert(order.id, order.clone());
    let location = format!("/orders/{}", order.id);
    (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(order),
    )
        .into_response()
}

async fn fetch(State(orders): State<Orders>, Path(id): Path<Uuid>) -> Response {
    match orders.read().unwrap().get(&id) {
        Some(order) => Json(order.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Serves on `addr` until killed.
pub fn serve(addr: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let orders: Orders = Arc::default();
        let app = Router::new()
            .route("/orders", post(create))
            .route("/orders/{id}", get(fetch))
            .with_state(orders);
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        axum::serve(listener, app).await.expect("serve");
    });
}
