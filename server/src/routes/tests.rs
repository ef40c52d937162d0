//! The app in-process, without a socket: validation on every protocol, routes, methods,
//! keys and lifecycle, against the scheduler's `FakeModel` (exact, instant) with GPT-J's
//! real tokenizer.
