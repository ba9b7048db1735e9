//! Reading `POST /v1/segment`'s body: the image's bytes as the whole body (`image/*`,
//! `application/octet-stream`, or no `Content-Type`), or a `multipart/form-data` upload of one file part named
//! `image` beside text fields holding parameters (`params`). Either way the body is held to `max` bytes (413:
//! from `Content-Length` before reading, else while reading, multipart framing included) and must arrive within
//! `BODY_TIMEOUT` (408). Multipart is parsed by `multer`, the parser under axum's own extractor, used directly
//! so these limits stay the route's own.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;

use super::bad_request;
use super::params::{Params, NAMES};
use crate::daemon::http::text;

/// How long a client has to send the whole body once its head is in.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// The most a multipart text field (a parameter) may hold.
const MAX_FIELD: u64 = 16 * 1024;
/// The multipart part that holds the image.
const IMAGE_PART: &str = "image";

/// The image's bytes; parameters sent in a multipart body are added to `params`.
pub(super) async fn read(
    body: Body,
    headers: &HeaderMap,
    max: usize,
    params: &mut Params,
) -> Result<Vec<u8>, Response> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large(max));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let kind = content_type
        .map(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let read = async {
        if kind == "multipart/form-data" {
            multipart(body, content_type.unwrap_or(""), max, params).await
        } else if kind.is_empty() || is_image_type(&kind) {
            whole(body, max).await
        } else {
            Err(text(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "Content-Type {kind} is not an image: send the image's bytes as image/* or \
                     application/octet-stream, or a multipart/form-data upload with the image in a part \
                     named '{IMAGE_PART}'\n"
                ),
            ))
        }
    };
    tokio::time::timeout(BODY_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| {
            Err(text(
                StatusCode::REQUEST_TIMEOUT,
                "the body did not arrive in time\n",
            ))
        })
}

/// A `Content-Type` an image may come as (the decoder then tells what the bytes are).
fn is_image_type(kind: &str) -> bool {
    kind.starts_with("image/") || kind == "application/octet-stream"
}

fn too_large(max: usize) -> Response {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the upload is over the limit of {max} bytes (http.segment_max_mb)\n"),
    )
}

/// The whole body is the image.
async fn whole(body: Body, max: usize) -> Result<Vec<u8>, Response> {
    match axum::body::to_bytes(body, max).await {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(e) => {
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if over {
                Err(too_large(max))
            } else {
                Err(bad_request(format_args!("cannot read the body: {e}")))
            }
        }
    }
}

/// One part named `image` (an image, or bytes of no stated type) and text fields named as parameters; any
/// other part is refused, so a misspelt parameter never goes unnoticed.
async fn multipart(
    body: Body,
    content_type: &str,
    max: usize,
    params: &mut Params,
) -> Result<Vec<u8>, Response> {
    let boundary = multer::parse_boundary(content_type).map_err(|e| {
        bad_request(format_args!(
            "multipart/form-data without a usable boundary: {e}"
        ))
    })?;
    let limits = multer::SizeLimit::new()
        .whole_stream(max as u64)
        .per_field(MAX_FIELD)
        .for_field(IMAGE_PART, max as u64);
    let mut parts = multer::Multipart::with_constraints(
        body.into_data_stream(),
        boundary,
        multer::Constraints::new().size_limit(limits),
    );
    let mut image: Option<Vec<u8>> = None;
    loop {
        let field = match parts.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return Err(multipart_error(e, max)),
        };
        let name = field.name().unwrap_or("").to_string();
        if name == IMAGE_PART {
            if image.is_some() {
                return Err(bad_request(
                    "two parts named 'image': send one image per request",
                ));
            }
            if let Some(kind) = field.content_type() {
                let kind = kind.essence_str().to_ascii_lowercase();
                if !is_image_type(&kind) {
                    return Err(text(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        format!(
                            "the part 'image' is {kind}, not an image: send it as image/* or \
                             application/octet-stream\n"
                        ),
                    ));
                }
            }
            let bytes = field.bytes().await.map_err(|e| multipart_error(e, max))?;
            image = Some(bytes.to_vec());
        } else if Params::known(&name) {
            if field.file_name().is_some() {
                return Err(bad_request(format_args!(
                    "the part '{name}' is a file: send parameters as text fields"
                )));
            }
            let value = field.text().await.map_err(|e| multipart_error(e, max))?;
            params.add(&name, &value).map_err(bad_request)?;
        } else if name.is_empty() {
            return Err(bad_request(
                "a multipart part without a name: name the image's part 'image' and each parameter's \
                 after it",
            ));
        } else {
            return Err(bad_request(format_args!(
                "unknown multipart part '{name}' (the image in 'image'; parameters: {NAMES})"
            )));
        }
    }
    image.ok_or_else(|| {
        bad_request(
            "no part named 'image': send the image as a file part named 'image' (curl -F image=@photo.jpg)",
        )
    })
}

/// A multipart error as a reply: over a size limit 413, anything else 400.
fn multipart_error(e: multer::Error, max: usize) -> Response {
    match e {
        multer::Error::StreamSizeExceeded { .. } => too_large(max),
        multer::Error::FieldSizeExceeded { field_name, limit } => {
            if field_name.as_deref() == Some(IMAGE_PART) {
                too_large(max)
            } else {
                text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the part '{}' is over {limit} bytes: parameters are short text fields\n",
                        field_name.as_deref().unwrap_or("")
                    ),
                )
            }
        }
        e => bad_request(format_args!("malformed multipart/form-data body: {e}")),
    }
}

#[cfg(test)]
mod tests {
    //! What `tests/http_segment.rs` cannot send through its client (which always declares the body's length):
    //! a multipart body over the limit found only while reading it, and one cut before its closing boundary.
    use super::*;
    use axum::http::HeaderValue;

    async fn refused(body: String, max: usize) -> (StatusCode, String) {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data; boundary=B"),
        );
        let reply = read(Body::from(body), &headers, max, &mut Params::default())
            .await
            .expect_err("refused");
        let code = reply.status();
        let text = axum::body::to_bytes(reply.into_body(), 1 << 16)
            .await
            .unwrap_or_default();
        (code, String::from_utf8_lossy(&text).into_owned())
    }

    #[tokio::test]
    async fn a_multipart_body_over_the_limit_or_cut_short_is_refused_while_reading() {
        let part = |name: &str, value: &str| {
            format!("--B\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
        };
        let over = format!("{}--B--\r\n", part("image", &"x".repeat(4096)));
        let (code, why) = refused(over, 1024).await;
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{why}");
        assert!(why.contains("http.segment_max_mb"), "{why}");

        let long_parameter = format!("{}--B--\r\n", part("queries", &"a,".repeat(10_000)));
        let (code, why) = refused(long_parameter, 1 << 20).await;
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{why}");
        assert!(why.contains("the part 'queries'"), "{why}");

        let cut = "--B\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc".to_string();
        let (code, why) = refused(cut, 1024).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{why}");
        assert!(why.contains("malformed multipart"), "{why}");
    }
}
