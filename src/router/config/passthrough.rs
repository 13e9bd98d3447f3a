//! vLLM's other APIs, passed through to one worker (flow/passthrough.rs): which paths, in
//! which groups, and which pool serves each group (--passthrough-pool). The paths are
//! vLLM 0.32's own (entrypoints/serve/tokenize/api_router.py, pooling/*/api_router.py,
//! speech_to_text, serve/instrumentator); a path not listed is a 404.

use clap::Args;

use crate::api::Role;

/// A group of passed-through paths that one pool serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum PathGroup {
    /// /tokenize, /detokenize, /v1/messages/count_tokens.
    Tokenizer,
    /// /v1/embeddings, /v2/embed, /pooling, /classify, /score, /v1/score, /rerank,
    /// /v1/rerank, /v2/rerank.
    Pooling,
    /// /v1/audio/transcriptions, /v1/audio/translations (multipart bodies).
    Audio,
    /// /version, /load (GET).
    Info,
}

/// Each passed-through path with its group; GET for the info group, POST for the rest.
pub(crate) const PATHS: &[(&str, PathGroup)] = &[
    ("/tokenize", PathGroup::Tokenizer),
    ("/detokenize", PathGroup::Tokenizer),
    ("/v1/messages/count_tokens", PathGroup::Tokenizer),
    ("/v1/embeddings", PathGroup::Pooling),
    ("/v2/embed", PathGroup::Pooling),
    ("/pooling", PathGroup::Pooling),
    ("/classify", PathGroup::Pooling),
    ("/score", PathGroup::Pooling),
    ("/v1/score", PathGroup::Pooling),
    ("/rerank", PathGroup::Pooling),
    ("/v1/rerank", PathGroup::Pooling),
    ("/v2/rerank", PathGroup::Pooling),
    ("/v1/audio/transcriptions", PathGroup::Audio),
    ("/v1/audio/translations", PathGroup::Audio),
    ("/version", PathGroup::Info),
    ("/load", PathGroup::Info),
];

#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Other vLLM APIs")]
pub(crate) struct PassthroughArgs {
    /// Which pool serves a group of passed-through paths, as GROUP=ROLE (repeatable; GROUP
    /// one of tokenizer, pooling, audio, info; ROLE prefill or decode). Defaults: tokenizer
    /// and pooling on prefills (prompt work), audio and info on decodes. Without PD, the one
    /// pool serves every group.
    #[arg(long, value_name = "GROUP=ROLE", value_parser = parse_group_role, action = clap::ArgAction::Append)]
    pub(crate) passthrough_pool: Vec<(PathGroup, Role)>,
}

fn parse_group_role(spec: &str) -> Result<(PathGroup, Role), String> {
    use clap::ValueEnum;
    let (group, role) = spec.split_once('=').ok_or_else(|| format!("expected GROUP=ROLE, not {spec:?}"))?;
    let group =
        PathGroup::from_str(group.trim(), true).map_err(|_| format!("no path group {group:?}: one of tokenizer, pooling, audio, info"))?;
    let role = match role.trim() {
        "prefill" => Role::Prefill,
        "decode" => Role::Decode,
        other => return Err(format!("no pool {other:?}: prefill or decode")),
    };
    Ok((group, role))
}

/// Which pool serves each group.
#[derive(Clone, Debug)]
pub(crate) struct PassthroughConfig {
    pools: Vec<(PathGroup, Role)>,
}

impl PassthroughArgs {
    pub(crate) fn to_config(&self) -> PassthroughConfig {
        PassthroughConfig { pools: self.passthrough_pool.clone() }
    }
}

impl PassthroughConfig {
    /// The role whose pool serves `group` (the last --passthrough-pool for it, or the default).
    pub(crate) fn role_for(&self, group: PathGroup) -> Role {
        self.pools.iter().rev().find(|(g, _)| *g == group).map(|(_, r)| *r).unwrap_or(match group {
            PathGroup::Tokenizer | PathGroup::Pooling => Role::Prefill,
            PathGroup::Audio | PathGroup::Info => Role::Decode,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_default_and_take_the_last_flag() {
        let none = PassthroughArgs::default().to_config();
        assert_eq!(none.role_for(PathGroup::Tokenizer), Role::Prefill);
        assert_eq!(none.role_for(PathGroup::Info), Role::Decode);
        let args = PassthroughArgs {
            passthrough_pool: vec![parse_group_role("tokenizer=decode").unwrap(), parse_group_role("Tokenizer = prefill").unwrap()],
        };
        assert_eq!(args.to_config().role_for(PathGroup::Tokenizer), Role::Prefill);
        assert!(parse_group_role("tokenizer").unwrap_err().contains("GROUP=ROLE"));
        assert!(parse_group_role("chat=prefill").unwrap_err().contains("no path group"));
        assert!(parse_group_role("audio=both").unwrap_err().contains("prefill or decode"));
    }
}
