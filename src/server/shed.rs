//! Load shedding: at most `--max-in-flight` calls in flight, over gRPC and
//! REST alike; a call over the budget is answered at once with
//! RESOURCE_EXHAUSTED (REST: 429 with `Retry-After`), before any of its
//! work is done, instead of queueing behind the others.
//!
//! A call is in flight from its arrival until its response has been sent
//! (its body dropped by hyper). Waits, worker and console streams do not
//! count (they are long-lived and have their own budget, `--max-waiters`),
//! nor do health, reflection, `/healthz` and `/metrics`; which calls count
//! is decided by the server's classification of requests (`app.rs`).
//!
//! The budget is one atomic counter: admitting a call costs an atomic add,
//! refusing one an add and a subtract. 0 switches shedding off.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use crate::error::Error;

/// How long a shed client is asked to wait (`RetryInfo`, `Retry-After`).
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The in-flight budget. Shared by every connection.
#[derive(Debug)]
pub struct Shed {
    limit: usize,
    in_flight: AtomicUsize,
    /// The gRPC refusal's headers, encoded once: a refusal must cost far
    /// less than the call it saves.
    grpc_refusal: http::HeaderMap,
}

/// A call's place in the budget; dropping it frees the place.
#[derive(Debug)]
pub struct Permit(Arc<Shed>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shed {
    /// A budget of `limit` calls; 0: unlimited.
    pub fn new(limit: usize) -> Arc<Self> {
        let refusal = tonic::Status::from(Self::error(limit));
        let grpc_refusal = refusal.into_http::<()>().into_parts().0.headers;
        Arc::new(Self {
            limit,
            in_flight: AtomicUsize::new(0),
            grpc_refusal,
        })
    }

    fn error(limit: usize) -> Error {
        Error::Overloaded {
            limit,
            retry_after: RETRY_AFTER,
        }
    }

    /// A place for one call, or the error that refuses it.
    pub fn admit(self: &Arc<Self>) -> Result<Option<Permit>, Error> {
        if self.limit == 0 {
            return Ok(None);
        }
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(Self::error(self.limit));
        }
        Ok(Some(Permit(self.clone())))
    }

    /// The headers of a trailers-only gRPC answer refusing a call (the
    /// status of [`Shed::admit`]'s error).
    pub fn grpc_refusal(&self) -> http::HeaderMap {
        self.grpc_refusal.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_admits_up_to_its_limit_and_frees_places() {
        let shed = Shed::new(2);
        let a = shed.admit().unwrap();
        let _b = shed.admit().unwrap();
        let refused = shed.admit().unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert_eq!(refused.reason(), "SERVER_OVERLOADED");
        drop(a);
        assert!(shed.admit().unwrap().is_some());
        assert!(Shed::new(0).admit().unwrap().is_none());
    }
}
