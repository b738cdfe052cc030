//! `groupbuy dead-letters ...`: the operator's dead-letter endpoints from the command line.
//! It talks HTTP to a running instance, like the load generator, so it works on any
//! deployment and on either bus (the embedded bus lives inside the serving process).

use clap::{Args, Subcommand};
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Where the deployment is and who asks.
#[derive(Args, Clone)]
pub struct Target {
    /// The deployment's base URL (plain HTTP).
    #[arg(long, default_value = "http://127.0.0.1:8080", global = true)]
    pub base_url: reqwest::Url,
    /// The operator's bearer token.
    #[arg(
        long,
        env = "GROUPBUY_OPERATOR_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub operator_token: Option<String>,
}

/// `groupbuy dead-letters ...`.
#[derive(Args)]
pub struct DeadLettersArgs {
    #[command(subcommand)]
    command: DeadLettersCommand,
    #[command(flatten)]
    target: Target,
}

#[derive(Subcommand)]
enum DeadLettersCommand {
    /// Lists the dead letters, oldest first: number, consumer, when, events and reason.
    List {
        /// Only letters numbered above this.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Most letters to list.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=500))]
        limit: u64,
        /// The API's JSON page instead of one line a letter.
        #[arg(long)]
        json: bool,
    },
    /// Prints one letter whole, with its events, as JSON.
    Show {
        /// The letter's number.
        id: u64,
    },
    /// Hands the letter back to its consumer and removes it once handled.
    Replay {
        /// The letter's number.
        id: u64,
    },
    /// Throws the letter away.
    Discard {
        /// The letter's number.
        id: u64,
    },
}

/// The request failed, or the API refused it.
#[derive(Debug, thiserror::Error)]
pub enum DeadLettersError {
    /// No operator token.
    #[error("the operator token is needed: --operator-token or GROUPBUY_OPERATOR_TOKEN")]
    NoToken,
    /// The instance could not be reached.
    #[error("{url}: {source}")]
    Unreachable {
        /// Where.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The API answered with a problem.
    #[error("{status}: {detail}")]
    Refused {
        /// The status.
        status: StatusCode,
        /// The problem's detail (or its body).
        detail: String,
    },
}

/// Runs `groupbuy dead-letters ...`; returns what to print.
pub async fn command(args: DeadLettersArgs) -> Result<String, DeadLettersError> {
    let target = &args.target;
    Ok(match args.command {
        DeadLettersCommand::List { after, limit, json } => {
            let path = format!("v1/admin/dead-letters?after={after}&limit={limit}");
            let page = call(target, Method::GET, &path).await?;
            if json {
                format!("{page}\n")
            } else {
                lines(&page)
            }
        }
        DeadLettersCommand::Show { id } => {
            let letter = call(target, Method::GET, &format!("v1/admin/dead-letters/{id}")).await?;
            format!("{letter:#}\n")
        }
        DeadLettersCommand::Replay { id } => {
            let path = format!("v1/admin/dead-letters/{id}/replay");
            let replayed = call(target, Method::POST, &path).await?;
            format!(
                "replayed dead letter {id}: {} handled {} event(s); the letter is removed\n",
                replayed["consumer"].as_str().unwrap_or("?"),
                replayed["events"]
            )
        }
        DeadLettersCommand::Discard { id } => {
            call(
                target,
                Method::DELETE,
                &format!("v1/admin/dead-letters/{id}"),
            )
            .await?;
            format!("discarded dead letter {id}\n")
        }
    })
}

/// One line a letter of `page`, and a last line saying how to go on.
pub fn lines(page: &Value) -> String {
    let mut out = String::new();
    let letters = page["dead_letters"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if letters.is_empty() {
        out.push_str("no dead letters\n");
    }
    for letter in letters {
        let events = match letter["events"].as_array() {
            Some(events) => events
                .iter()
                .map(|e| {
                    format!(
                        "{} {}@{}",
                        e["event_type"].as_str().unwrap_or("?"),
                        e["stream_id"].as_str().unwrap_or("?"),
                        e["stream_version"]
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
            None => "(unreadable body)".to_owned(),
        };
        out.push_str(&format!(
            "{:>6}  {}  {}  {}  -- {}\n",
            letter["id"],
            letter["stored_at"].as_str().unwrap_or("?"),
            letter["consumer"].as_str().unwrap_or("?"),
            events,
            letter["reason"].as_str().unwrap_or("")
        ));
    }
    if let Some(next) = page["next_after"].as_u64() {
        out.push_str(&format!("more: --after {next}\n"));
    }
    out
}

async fn call(target: &Target, method: Method, path: &str) -> Result<Value, DeadLettersError> {
    let token = target
        .operator_token
        .as_deref()
        .ok_or(DeadLettersError::NoToken)?;
    let url = target.base_url.join(path).expect("a relative path joins");
    let unreachable = |source| DeadLettersError::Unreachable {
        url: url.to_string(),
        source,
    };
    let response = reqwest::Client::new()
        .request(method, url.clone())
        .bearer_auth(token)
        .send()
        .await
        .map_err(unreachable)?;
    let status = response.status();
    let text = response.text().await.map_err(unreachable)?;
    let body: Value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    if status.is_success() {
        Ok(body)
    } else {
        Err(DeadLettersError::Refused {
            status,
            detail: body["detail"]
                .as_str()
                .map_or_else(|| body.to_string(), str::to_owned),
        })
    }
}
