//! The gRPC request guard: the request body of every call to opsd's
//! services, checked as it arrives, before tonic buffers and decodes it.
//!
//! - A message whose length prefix is over `--max-message-size` is refused
//!   as soon as its 5-byte prefix arrives (RESOURCE_EXHAUSTED, as gRPC's
//!   own rule says; tonic's check would answer OUT_OF_RANGE), so a client
//!   that claims 4 GiB never makes the server buffer anything.
//! - A prefix whose compression flag is neither 0 nor 1, and a body that
//!   ends inside a message, are the client's mistakes: INVALID_ARGUMENT
//!   (tonic says INTERNAL). (A flag of 1 without `grpc-encoding` stays
//!   tonic's INTERNAL, as the gRPC spec requires.)
//! - A body still incomplete `--body-read-timeout` after the call arrived is
//!   refused (INVALID_ARGUMENT, as for REST), so a slow client does not hold
//!   a call in flight for ever. The timer is armed only if the body is not
//!   complete on its first read, as it is for nearly every unary call.
//!
//! The errors are `tonic::Status`es built by the one error mapping; tonic
//! finds them in the body's error and answers with them. Only unary request
//! bodies are guarded: the streams of health and reflection are not opsd's.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::error::Error;

/// The gRPC message prefix: a compression flag and a 4-byte length.
const PREFIX: usize = 5;

/// What the guard checks.
#[derive(Clone, Copy, Debug)]
pub struct GuardSettings {
    /// `--max-message-size`.
    pub max_message_size: usize,
    /// `--body-read-timeout`.
    pub body_read_timeout: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project_lite::pin_project! {
    /// A request body, guarded when `settings` is set.
    pub struct Guarded<B> {
        #[pin]
        inner: B,
        settings: Option<GuardSettings>,
        arrived: Instant,
        prefix: [u8; PREFIX],
        have: usize,
        // Bytes of the current message still to come.
        left: usize,
        timer: Option<Pin<Box<Sleep>>>,
        failed: bool,
    }
}

impl<B> Guarded<B> {
    /// `inner`, checked with `settings` (`None`: passed through).
    pub fn new(inner: B, settings: Option<GuardSettings>) -> Self {
        Self {
            inner,
            settings,
            arrived: Instant::now(),
            prefix: [0; PREFIX],
            have: 0,
            left: 0,
            timer: None,
            failed: false,
        }
    }
}

fn refuse(error: Error) -> BoxError {
    Box::new(tonic::Status::from(error))
}

/// Follows the messages of `data`; an error for the first bad prefix.
fn check(
    settings: &GuardSettings,
    prefix: &mut [u8; PREFIX],
    have: &mut usize,
    left: &mut usize,
    mut data: &[u8],
) -> Result<(), Error> {
    while !data.is_empty() {
        if *left > 0 {
            let n = (*left).min(data.len());
            *left -= n;
            data = &data[n..];
            continue;
        }
        let n = (PREFIX - *have).min(data.len());
        prefix[*have..*have + n].copy_from_slice(&data[..n]);
        *have += n;
        data = &data[n..];
        if *have < PREFIX {
            break;
        }
        *have = 0;
        let size = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if prefix[0] > 1 {
            return Err(Error::MalformedMessage {
                field: None,
                description: format!(
                    "the message prefix has compression flag {}; it must be 0 or 1",
                    prefix[0]
                ),
            });
        }
        if size > settings.max_message_size {
            return Err(Error::MessageTooLarge {
                size,
                limit: settings.max_message_size,
            });
        }
        *left = size;
    }
    Ok(())
}

impl<B> Body for Guarded<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let Some(settings) = this.settings else {
            return this.inner.poll_frame(cx).map_err(Into::into);
        };
        if *this.failed {
            return Poll::Ready(None);
        }
        let polled = this.inner.poll_frame(cx);
        let fail = |failed: &mut bool, error: Error| {
            *failed = true;
            Poll::Ready(Some(Err(refuse(error))))
        };
        match polled {
            Poll::Pending => {
                let deadline = *this.arrived + settings.body_read_timeout;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
                if timer.as_mut().poll(cx).is_ready() {
                    let timeout = settings.body_read_timeout;
                    return fail(
                        this.failed,
                        Error::invalid(
                            "body",
                            format!(
                                "the request body did not arrive within {timeout:?} (--body-read-timeout)"
                            ),
                        ),
                    );
                }
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(error) =
                        check(settings, this.prefix, this.have, this.left, data.chunk())
                    {
                        return fail(this.failed, error);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err.into()))),
            Poll::Ready(None) => {
                if *this.have > 0 || *this.left > 0 {
                    return fail(
                        this.failed,
                        Error::MalformedMessage {
                            field: None,
                            description: "the request body ends inside a message".into(),
                        },
                    );
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};
    use tonic::Code;

    use super::*;

    const SETTINGS: GuardSettings = GuardSettings {
        max_message_size: 100,
        body_read_timeout: Duration::from_millis(50),
    };

    fn message(len: u32, flag: u8) -> Vec<u8> {
        let mut bytes = vec![flag];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend(std::iter::repeat_n(7u8, len.min(1000) as usize));
        bytes
    }

    async fn read(chunks: Vec<Vec<u8>>) -> Result<Vec<u8>, tonic::Status> {
        let stream = tokio_stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(Frame::data(Bytes::from(c)))),
        );
        let body = Guarded::new(StreamBody::new(stream), Some(SETTINGS));
        match body.collect().await {
            Ok(collected) => Ok(collected.to_bytes().to_vec()),
            Err(err) => Err(*err.downcast::<tonic::Status>().unwrap()),
        }
    }

    #[tokio::test]
    async fn messages_within_the_limit_pass_whole_in_any_split() {
        let bytes = [message(100, 0), message(0, 0), message(3, 0)].concat();
        for size in [1, 2, 5, 7, 200] {
            let chunks = bytes.chunks(size).map(<[u8]>::to_vec).collect();
            assert_eq!(read(chunks).await.unwrap(), bytes);
        }
    }

    #[tokio::test]
    async fn a_message_over_the_limit_is_refused_at_its_prefix() {
        let status = read(vec![message(101, 0)[..5].to_vec()]).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status.message().contains("101 bytes"),
            "{}",
            status.message()
        );
        let status = read(vec![message(3, 2)]).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let status = read(vec![message(10, 0)[..8].to_vec()]).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("ends inside"),
            "{}",
            status.message()
        );
    }

    #[tokio::test]
    async fn a_body_that_does_not_arrive_in_time_is_refused() {
        let stream = tokio_stream::pending::<Result<Frame<Bytes>, std::io::Error>>();
        let body = Guarded::new(StreamBody::new(stream), Some(SETTINGS));
        let err = body.collect().await.unwrap_err();
        let status = err.downcast::<tonic::Status>().unwrap();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("--body-read-timeout"));
    }
}
