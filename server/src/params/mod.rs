/*!
Generation parameters: from the wire, to validated per-sequence settings.

Parse, don't validate: a protocol reads its body's parameters with a [`ParamsReader`] in its
own [`Dialect`] (names and where they sit), which checks each against the one table of
parameters ([`PARAMETERS`]) and gives [`RequestParams`], every field optional. Then
[`Defaults::resolve`] combines them with the server's defaults and one prompt's length into a
[`Plan`], the only thing the generation code takes.

- [`error`]: [`ValidationError`], every way a request can be wrong;
- [`json`]: typed readers of JSON values;
- [`table`]: the parameters, [`RequestParams`] and the dialects;
- [`resolve`]: defaults and plans.
*/

pub mod error;
pub mod json;
pub mod resolve;
pub mod table;

pub use error::{PromptName, ValidationError};
pub use json::{describe, parse_body};
pub use resolve::{Defaults, DefaultsError, Plan};
pub use table::{Dialect, Limits, Names, ParamsReader, RequestParams, PARAMETERS};
