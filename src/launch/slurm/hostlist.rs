//! Slurm's host lists as Slurm writes them (`SLURM_JOB_NODELIST=gpu[01-04,07],login`):
//! hosts separated by commas, each with any number of bracketed groups of numbers and
//! ranges, a range as wide as its low bound (`[01-10]` → `01` … `10`). The expansion is
//! `scontrol show hostnames`' (checked against it in tests/slurm.rs).

use anyhow::{bail, Context};

/// More hosts than this is not a list Slurm would hand a job.
const MAX_HOSTS: usize = 65_536;

/// Every host of `list`, in order.
pub fn expand(list: &str) -> anyhow::Result<Vec<String>> {
    let mut hosts = Vec::new();
    for part in split_top(list)? {
        if part.is_empty() {
            bail!("host list `{list}`: an empty host name");
        }
        expand_one(part, String::new(), &mut hosts).with_context(|| format!("host list `{list}`"))?;
    }
    Ok(hosts)
}

/// Splits on the commas outside brackets.
fn split_top(list: &str) -> anyhow::Result<Vec<&str>> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            '[' => bail!("host list `{list}`: nested brackets"),
            ']' if depth == 1 => depth = 0,
            ']' => bail!("host list `{list}`: `]` without `[`"),
            ',' if depth == 0 => {
                parts.push(list[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        bail!("host list `{list}`: `[` without `]`");
    }
    parts.push(list[start..].trim());
    Ok(parts)
}

fn expand_one(rest: &str, prefix: String, out: &mut Vec<String>) -> anyhow::Result<()> {
    let Some(open) = rest.find('[') else {
        if out.len() >= MAX_HOSTS {
            bail!("more than {MAX_HOSTS} hosts");
        }
        out.push(prefix + rest);
        return Ok(());
    };
    let close = open + rest[open..].find(']').context("`[` without `]`")?;
    let head = format!("{prefix}{}", &rest[..open]);
    let tail = &rest[close + 1..];
    for item in rest[open + 1..close].split(',') {
        let (lo, hi) = item.split_once('-').unwrap_or((item, item));
        let (lo_n, hi_n) = (number(lo)?, number(hi)?);
        if hi_n < lo_n {
            bail!("range `{item}` runs backwards");
        }
        if hi_n - lo_n >= MAX_HOSTS as u64 {
            bail!("range `{item}` has more than {MAX_HOSTS} hosts");
        }
        for n in lo_n..=hi_n {
            expand_one(tail, format!("{head}{n:0width$}", width = lo.len()), out)?;
        }
    }
    Ok(())
}

fn number(s: &str) -> anyhow::Result<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 18 {
        bail!("`{s}` is not a number in a range");
    }
    Ok(s.parse()?)
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn expands_as_slurm_writes_lists() {
        assert_eq!(expand("gpu[01-04,07]").unwrap(), ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]);
        assert_eq!(expand("n[1-3],login").unwrap(), ["n1", "n2", "n3", "login"]);
        assert_eq!(expand("x[1-2]-y[3-4]").unwrap(), ["x1-y3", "x1-y4", "x2-y3", "x2-y4"]);
        assert_eq!(expand("a[8-10]").unwrap(), ["a8", "a9", "a10"]);
        assert_eq!(expand("node7").unwrap(), ["node7"]);
    }

    #[test]
    fn refuses_what_slurm_never_writes() {
        for bad in ["n[1-", "n]1", "n[3-1]", "n[a-b]", "n[[1]]", "a,,b", "n[0-99999999]"] {
            assert!(expand(bad).is_err(), "{bad} was taken");
        }
    }
}
