//! Request bodies on their way in: a budget of bytes that all of them together may hold,
//! and a deadline for each.
//!
//! A JSON body is buffered whole before it is parsed (up to 1 MiB, 64 MiB for a run). With
//! neither bound, a client that sent most of a big body and then stalled held that memory
//! for as long as it liked, once per connection: twenty such connections held 1.3 GB in an
//! audit. Uploads (`PUT`) stream to storage, so they take nothing from the budget and have
//! no overall deadline (a big build on a slow link takes long); they are cut off instead
//! once no byte has come for the stall limit, so that a client that vanished mid-upload
//! does not hold its connection, temp file or database part buffer forever.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// The budget is counted in KiB, so that it fits a semaphore's permits.
const UNIT: usize = 1024;

/// The shared budget, the deadline and the uploads' stall limit.
#[derive(Debug)]
pub struct Intake {
    budget: Arc<Semaphore>,
    deadline: Duration,
    stall: Duration,
}

impl Intake {
    /// At most `bytes` buffered across all bodies in flight; each body must arrive within
    /// `deadline` of its request; an upload may go at most `stall` without a byte.
    pub fn new(bytes: usize, deadline: Duration, stall: Duration) -> Self {
        Intake {
            budget: Arc::new(Semaphore::new((bytes / UNIT).max(1))),
            deadline,
            stall,
        }
    }
}

/// Why a body was cut off; found again in the extractor's error chain by
/// [`refused_body`].
#[derive(Debug)]
struct Refused {
    status: StatusCode,
    code: &'static str,
    message: &'static str,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message)
    }
}

impl std::error::Error for Refused {}

/// The middleware: wraps every request body, an upload's with the stall limit only.
pub async fn guard(State(intake): State<Arc<Intake>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    if parts.method == Method::PUT {
        let body = Body::new(Stalling {
            inner: body,
            stall: intake.stall,
            idle: None,
        });
        return next.run(Request::from_parts(parts, body)).await;
    }
    let body = Body::new(Budgeted {
        inner: body,
        budget: Arc::clone(&intake.budget),
        held: None,
        deadline: Box::pin(tokio::time::sleep(intake.deadline)),
    });
    next.run(Request::from_parts(parts, body)).await
}

/// The [`ApiError`] for a body [`guard`] cut off, if `err` (a body-reading rejection) is
/// one: 408 `request_timeout` past the deadline, 503 `unavailable` when the budget is
/// spent.
pub fn refused_body(err: &(dyn std::error::Error + 'static)) -> Option<ApiError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<Refused>() {
            return Some(ApiError::new(r.status, r.code, r.message));
        }
        cur = e.source();
    }
    None
}

struct Budgeted {
    inner: Body,
    budget: Arc<Semaphore>,
    /// What this body's bytes so far took from the budget, given back when it is dropped
    /// (once the extractor has the whole body, or gave up).
    held: Option<OwnedSemaphorePermit>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for Budgeted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(axum::Error::new(Refused {
                status: StatusCode::REQUEST_TIMEOUT,
                code: "request_timeout",
                message: "the request body did not arrive in time",
            }))));
        }
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &frame {
            if let Some(data) = f.data_ref() {
                let units = u32::try_from(data.len().div_ceil(UNIT)).unwrap_or(u32::MAX);
                match Arc::clone(&this.budget).try_acquire_many_owned(units) {
                    Ok(p) => match &mut this.held {
                        Some(h) => h.merge(p),
                        None => this.held = Some(p),
                    },
                    Err(_) => {
                        return Poll::Ready(Some(Err(axum::Error::new(Refused {
                            status: StatusCode::SERVICE_UNAVAILABLE,
                            code: "unavailable",
                            message: "the server is receiving too much at once; retry shortly",
                        }))))
                    }
                }
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An upload's body: fails with 408 once `stall` passes without a frame.
struct Stalling {
    inner: Body,
    stall: Duration,
    /// Fires `stall` after the last frame, or after the first read (set then): a client
    /// that sent `Expect: 100-continue` sends nothing until the handler reads.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for Stalling {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        let next = tokio::time::Instant::now() + this.stall;
        let idle = match &mut this.idle {
            Some(idle) if frame.is_ready() => {
                idle.as_mut().reset(next);
                idle
            }
            Some(idle) => idle,
            None => this.idle.insert(Box::pin(tokio::time::sleep_until(next))),
        };
        if frame.is_ready() {
            return frame;
        }
        if idle.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(axum::Error::new(Refused {
                status: StatusCode::REQUEST_TIMEOUT,
                code: "request_timeout",
                message: "the upload stalled: no data arrived for too long",
            }))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
