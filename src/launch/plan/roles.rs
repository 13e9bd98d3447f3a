//! A role's settings as the plan uses them: general.params under the role's params, its
//! DP size and load-balancing layout, its base ports and its KV connector.

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use super::{Ctx, Role};
use crate::launch::spec::config::{scalar, ConfigError, DpMode, EngineKind, LaunchFile, RoleFile};
use crate::launch::spec::connector::{self as launch_connector, Connector};

pub(super) struct RoleSpec {
    pub(crate) role: Role,
    pub(crate) replicas: u32,
    pub(crate) num_gpus: u32,
    pub(crate) envs: BTreeMap<String, Value>,
    /// general.params under the role's own; DP keys the plan owns taken out.
    pub(crate) params: BTreeMap<String, Value>,
    /// `_extra_params` of general and the role, split into arguments.
    pub(crate) extra: Vec<String>,
    pub(crate) dp: u32,
    pub(crate) layout: DpMode,
    pub(crate) port: u16,
    pub(crate) side: u16,
    /// The connector flow `disagg route` runs for it (None: a scheduler.command's own).
    pub(crate) flow: Option<Connector>,
    /// The connector's class name (None for the simulator without a kv_transfer_config).
    pub(crate) class: Option<String>,
    /// Its instances take either leg (the router's --pd-pool).
    pub(crate) elastic: bool,
}

impl RoleSpec {
    pub(crate) fn name(&self) -> &'static str {
        self.role.as_str()
    }
}

pub(super) fn specs(f: &LaunchFile, cx: &Ctx<'_>) -> Result<[RoleSpec; 2], ConfigError> {
    let mut general = f.general.params.clone();
    let general_extra = take_extra(&mut general, cx, "general.params._extra_params")?;
    let spec = |role: Role, rf: &RoleFile| spec(f, cx, role, rf, &general, &general_extra);
    let roles = [spec(Role::Prefill, &f.prefill)?, spec(Role::Decode, &f.decode)?];
    if roles[0].flow != roles[1].flow {
        return Err(cx.err("decode.params.kv_transfer_config", "names another connector than the prefill's: both roles need the same one"));
    }
    Ok(roles)
}

fn spec(
    f: &LaunchFile,
    cx: &Ctx<'_>,
    role: Role,
    rf: &RoleFile,
    general: &BTreeMap<String, Value>,
    general_extra: &[String],
) -> Result<RoleSpec, ConfigError> {
    let name = role.as_str();
    if rf.replicas == 0 {
        return Err(cx.err(&format!("{name}.replicas"), "must be greater than 0"));
    }
    if f.num_gpus > 0 && rf.num_gpus % f.gpus_per_worker != 0 {
        return Err(
            cx.err(&format!("{name}.num_gpus"), format!("{} is not a multiple of gpus_per_worker {}", rf.num_gpus, f.gpus_per_worker))
        );
    }
    let mut params = general.clone();
    if let Some(tls) = &f.tls {
        for (k, v) in tls.engine_params() {
            if params.contains_key(k) || rf.params.contains_key(k) {
                return Err(cx.err(
                    &format!("{name}.params.{k}"),
                    "TLS is set in `tls:` (for the engines, the router and the health checks together): drop it here",
                ));
            }
            params.insert(k.to_string(), Value::String(v));
        }
    }
    let mut own = rf.params.clone();
    let mut extra = general_extra.to_vec();
    extra.extend(take_extra(&mut own, cx, &format!("{name}.params._extra_params"))?);
    params.extend(own);
    let dp = data_parallel_size(cx, name, rf, &mut params)?;
    if rf.num_gpus > 0 && rf.num_gpus % dp != 0 {
        return Err(cx.err(&format!("{name}.num_gpus"), format!("{} GPUs do not split over {dp} DP ranks", rf.num_gpus)));
    }
    let layout = layout(cx, name, rf, &mut params)?;
    let (flow, class) = kv_flow(cx, name, &params, f.engine.kind(), f.scheduler.command.is_some())?;
    let (port, side) = match role {
        Role::Prefill => (rf.port.unwrap_or(8100), rf.side_channel_port.unwrap_or(5600)),
        Role::Decode | Role::Both => (rf.port.unwrap_or(9100), rf.side_channel_port.unwrap_or(6600)),
    };
    if rf.elastic && (flow != Some(Connector::Nixl) || kv_role(&params).is_some_and(|r| r != "kv_both")) {
        return Err(cx.err(
            &format!("{name}.elastic"),
            "elastic instances take either leg: they need NixlConnector with \"kv_role\":\"kv_both\" in kv_transfer_config",
        ));
    }
    if flow == Some(Connector::P2pNccl) && dp > 1 {
        return Err(
            cx.err(&format!("{name}.data_parallel_size"), "P2pNccl runs one engine per instance (the xPyD guide's layout): use replicas")
        );
    }
    Ok(RoleSpec {
        role,
        replicas: rf.replicas,
        num_gpus: rf.num_gpus,
        envs: rf.envs.clone(),
        params,
        extra,
        dp,
        layout,
        port,
        side,
        flow,
        class,
        elastic: rf.elastic,
    })
}

/// The `kv_role` a role's kv_transfer_config names, if any.
fn kv_role(params: &BTreeMap<String, Value>) -> Option<String> {
    let raw = match params.get("kv_transfer_config")? {
        Value::String(s) => s.clone(),
        other => serde_json::to_string(other).ok()?,
    };
    let v: serde_json::Value = serde_json::from_str(&raw.replace("{KV_IP}", "0.0.0.0").replace("{PORT}", "0")).ok()?;
    v["kv_role"].as_str().map(str::to_owned)
}

/// `<role>.data_parallel_size` or `params.data_parallel_size` (equal when both are given).
fn data_parallel_size(cx: &Ctx<'_>, name: &str, rf: &RoleFile, params: &mut BTreeMap<String, Value>) -> Result<u32, ConfigError> {
    let from_params = match params.remove("data_parallel_size") {
        None => None,
        Some(v) => Some(
            scalar(&v)
                .and_then(|s| s.parse::<u32>().ok())
                .ok_or_else(|| cx.err(&format!("{name}.params.data_parallel_size"), "must be a positive integer"))?,
        ),
    };
    let dp = match (rf.data_parallel_size, from_params) {
        (Some(a), Some(b)) if a != b => {
            return Err(
                cx.err(&format!("{name}.params.data_parallel_size"), format!("is {b}, but {name}.data_parallel_size is {a}: give it once"))
            )
        }
        (Some(d), _) | (None, Some(d)) => d,
        (None, None) => 1,
    };
    if dp == 0 {
        return Err(cx.err(&format!("{name}.data_parallel_size"), "must be at least 1"));
    }
    Ok(dp)
}

/// The DP layout: `dp_mode`, or vLLM's own flags for it in params (taken out: the plan
/// writes them where they belong).
fn layout(cx: &Ctx<'_>, name: &str, rf: &RoleFile, params: &mut BTreeMap<String, Value>) -> Result<DpMode, ConfigError> {
    let mut from_params = None;
    for (key, mode) in [("data_parallel_hybrid_lb", DpMode::Hybrid), ("data_parallel_external_lb", DpMode::External)] {
        match params.remove(key) {
            None | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) | Some(Value::Null) => {
                if from_params.is_some_and(|m| m != mode) {
                    return Err(
                        cx.err(&format!("{name}.params.{key}"), "vLLM takes one DP load-balancing mode: hybrid or external, not both")
                    );
                }
                from_params = Some(mode);
            }
            Some(_) => return Err(cx.err(&format!("{name}.params.{key}"), "must be true or false")),
        }
    }
    match (rf.dp_mode, from_params) {
        (Some(a), Some(b)) if a != b => {
            Err(cx.err(&format!("{name}.dp_mode"), format!("is {a:?}, but the params ask for {b:?} load balancing: say it once")))
        }
        (Some(m), _) | (None, Some(m)) => Ok(m),
        (None, None) => Ok(DpMode::Internal),
    }
}

fn take_extra(params: &mut BTreeMap<String, Value>, cx: &Ctx<'_>, path: &str) -> Result<Vec<String>, ConfigError> {
    match params.remove("_extra_params") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => shlex::split(&s).ok_or_else(|| cx.err(path, "is not a valid argument string")),
        Some(_) => Err(cx.err(path, "must be a string of extra arguments")),
    }
}

/// The connector flow of a role's `kv_transfer_config` (required for vLLM engines; the
/// simulator runs NIXL's without one). Without a scheduler.command, it must be one
/// `disagg route` runs.
fn kv_flow(
    cx: &Ctx<'_>,
    role: &str,
    params: &BTreeMap<String, Value>,
    engine: EngineKind,
    custom_router: bool,
) -> Result<(Option<Connector>, Option<String>), ConfigError> {
    let path = format!("{role}.params.kv_transfer_config");
    let raw = match params.get("kv_transfer_config") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Mapping(_)) => serde_json::to_string(&params["kv_transfer_config"]).unwrap_or_default(),
        Some(_) => return Err(cx.err(&path, "must be a JSON string (or a mapping)")),
        None if engine == EngineKind::Sim => return Ok((Some(Connector::Nixl), None)),
        None => return Err(cx.err(&path, "is required: a prefill/decode deployment needs a KV connector (e.g. '{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_producer\"}')")),
    };
    let probe = raw.replace("{KV_IP}", "0.0.0.0").replace("{PORT}", "0").replace("{NODE_NAME}", "n");
    let v: serde_json::Value = serde_json::from_str(&probe).map_err(|e| cx.err(&path, format!("is not valid JSON: {e}")))?;
    let class = launch_connector::class_of(&v).map_err(|e| cx.err(&path, e))?;
    let flow = launch_connector::flow_of(&v, &class).map_err(|e| cx.err(&path, e))?;
    if flow.is_none() && !custom_router {
        return Err(cx.err(&path, format!(
            "kv_connector {class}: disagg route runs the flows of NixlConnector (and LLMDataDistCMgrConnector), MooncakeConnector and P2pNcclConnector; for {class}, give scheduler.command a proxy that speaks it")));
    }
    Ok((flow, Some(class)))
}
