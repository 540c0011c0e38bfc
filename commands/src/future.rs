//! The boxed future the object-safe traits return.

use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future: what the context's methods return so that the context stays object-safe. Command
/// files never need it: they write `async fn handle`, and the registry boxes it once.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
