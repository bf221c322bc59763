//! Named profiles of `~/.aws/credentials` and `~/.aws/config`, read minimally: object_store
//! takes credentials from the environment, web identity and instance metadata, but not from
//! these files. Static keys (with an optional session token), `region` and `endpoint_url` are
//! read; SSO, `credential_process` and `role_arn` profiles are not (use the environment).

use std::collections::HashMap;
use std::path::PathBuf;

/// What a profile says; every field optional.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Profile {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

/// `section name -> key -> value` of an INI file as the AWS tools write it.
pub fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut section: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.trim().to_string());
            continue;
        }
        if let (Some(s), Some((k, v))) = (&section, line.split_once('=')) {
            out.entry(s.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    out
}

fn home_file(var: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")?;
    Some(PathBuf::from(home).join(".aws").join(name))
}

/// The profile `name` from the texts of the credentials and config files. `None` when
/// neither has it.
pub fn profile_from(name: &str, credentials: &str, config: &str) -> Option<Profile> {
    let creds = parse_ini(credentials);
    let conf = parse_ini(config);
    let in_creds = creds.get(name);
    // In the config file the default profile is `[default]`, the others `[profile NAME]`.
    let in_conf = conf
        .get(&format!("profile {name}"))
        .or_else(|| (name == "default").then(|| conf.get("default")).flatten());
    if in_creds.is_none() && in_conf.is_none() {
        return None;
    }
    let get = |k: &str| {
        in_creds
            .and_then(|s| s.get(k))
            .or_else(|| in_conf.and_then(|s| s.get(k)))
            .filter(|v| !v.is_empty())
            .cloned()
    };
    Some(Profile {
        access_key_id: get("aws_access_key_id"),
        secret_access_key: get("aws_secret_access_key"),
        session_token: get("aws_session_token"),
        region: in_conf.and_then(|s| s.get("region")).cloned(),
        endpoint_url: in_conf.and_then(|s| s.get("endpoint_url")).cloned(),
    })
}

/// The profile named by `AWS_PROFILE` (else `default`), from `AWS_SHARED_CREDENTIALS_FILE`
/// (else `~/.aws/credentials`) and `AWS_CONFIG_FILE` (else `~/.aws/config`). `Err` only when
/// `AWS_PROFILE` names a profile that neither file has.
pub fn load() -> Result<Option<Profile>, String> {
    let named = std::env::var("AWS_PROFILE").ok().filter(|s| !s.is_empty());
    let name = named.clone().unwrap_or_else(|| "default".into());
    let read = |p: Option<PathBuf>| {
        p.and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    };
    let credentials = read(home_file("AWS_SHARED_CREDENTIALS_FILE", "credentials"));
    let config = read(home_file("AWS_CONFIG_FILE", "config"));
    match profile_from(&name, &credentials, &config) {
        Some(p) => Ok(Some(p)),
        None if named.is_some() => Err(format!(
            "AWS_PROFILE={name}: no such profile in ~/.aws/credentials or ~/.aws/config"
        )),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_keys_region_and_endpoint() {
        let creds = "[default]\naws_access_key_id = AK\naws_secret_access_key=SK\n\n[dev]\n# c\naws_access_key_id = DK\naws_secret_access_key = DS\naws_session_token = T\n";
        let conf = "[default]\nregion = eu-west-1\n[profile dev]\nregion=us-west-2\nendpoint_url = http://minio:9000\n";
        let d = profile_from("default", creds, conf).unwrap();
        assert_eq!(d.access_key_id.as_deref(), Some("AK"));
        assert_eq!(d.region.as_deref(), Some("eu-west-1"));
        assert_eq!(d.endpoint_url, None);
        let p = profile_from("dev", creds, conf).unwrap();
        assert_eq!(p.session_token.as_deref(), Some("T"));
        assert_eq!(p.region.as_deref(), Some("us-west-2"));
        assert_eq!(p.endpoint_url.as_deref(), Some("http://minio:9000"));
        assert!(profile_from("nope", creds, conf).is_none());
        // keys may live in the config file too
        let only_conf = profile_from("x", "", "[profile x]\naws_access_key_id=K\n").unwrap();
        assert_eq!(only_conf.access_key_id.as_deref(), Some("K"));
    }
}
