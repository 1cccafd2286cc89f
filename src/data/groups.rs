//! Groups of a table dataset: the (label, attribute) cells, any number of attribute values
//! per class, and which of them are the minority ("bias-conflicting") groups that
//! up-weighting, JTT's report, `--groups aligned-conflict` and the aligned/conflicting metrics
//! use. DFA data keeps its own rule (conflicting = label differs from the bias attribute,
//! `Split::groups` is `None`); a table dataset's minority groups are chosen once, on the
//! training split, by [`MinorityRule`], and shared by its three splits.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// How the minority groups of a table dataset are chosen (`--minority-share`,
/// `--minority-groups`).
#[derive(Debug, Clone, PartialEq)]
pub enum MinorityRule {
    /// The groups holding less than this share of their class's training samples.
    ShareBelow(f64),
    /// Exactly these (label, attribute) groups.
    Listed(Vec<(u32, u32)>),
}

impl MinorityRule {
    /// The rule in words, as `summary.json` records it.
    pub fn describe(&self) -> String {
        match self {
            MinorityRule::ShareBelow(t) => format!(
                "groups (label, attribute) holding less than {t} of their class's training \
                 samples (--minority-share)"
            ),
            MinorityRule::Listed(_) => "the groups listed by --minority-groups".to_string(),
        }
    }
}

/// Parses `--minority-groups`: `LABEL:ATTRIBUTE` pairs separated by commas, e.g. `0:1,1:0`.
pub fn parse_group_list(s: &str) -> Result<Vec<(u32, u32)>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (l, a) = part.split_once(':').with_context(|| {
            format!("--minority-groups: {part:?} is not LABEL:ATTRIBUTE (e.g. 0:1,1:0)")
        })?;
        let num = |v: &str| {
            v.trim().parse::<u32>().with_context(|| {
                format!("--minority-groups: {part:?}: {v:?} is not a non-negative integer")
            })
        };
        out.push((num(l)?, num(a)?));
    }
    if out.is_empty() {
        bail!("--minority-groups is empty; give LABEL:ATTRIBUTE pairs such as 0:1,1:0");
    }
    Ok(out)
}

/// One training group: its size, its share of its class, and whether it is a minority group.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupEntry {
    pub label: u32,
    pub attribute: u32,
    pub count: usize,
    pub share_in_class: f64,
    pub minority: bool,
}

/// The groups of a table dataset (shared by its splits through `Split::groups`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupInfo {
    /// The rule that chose the minority groups, in words.
    pub rule: String,
    /// The training split's groups, in (label, attribute) order.
    pub train_groups: Vec<GroupEntry>,
    #[serde(skip)]
    pub minority: BTreeSet<(u32, u32)>,
    /// Class names in label order, where the table spelled labels as names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_names: Option<Vec<String>>,
    /// Attribute names in value order, where the table spelled attributes as names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribute_names: Option<Vec<String>>,
}

impl GroupInfo {
    /// Chooses the minority groups of the training labels/attributes by `rule`.
    pub fn choose(labels: &[u32], attrs: &[u32], rule: &MinorityRule) -> Result<GroupInfo> {
        let mut counts: BTreeMap<(u32, u32), usize> = BTreeMap::new();
        let mut class: BTreeMap<u32, usize> = BTreeMap::new();
        for (&l, &a) in labels.iter().zip(attrs) {
            *counts.entry((l, a)).or_insert(0) += 1;
            *class.entry(l).or_insert(0) += 1;
        }
        let share = |(l, a): (u32, u32)| counts[&(l, a)] as f64 / class[&l] as f64;
        let minority: BTreeSet<(u32, u32)> = match rule {
            MinorityRule::ShareBelow(t) => {
                counts.keys().copied().filter(|&g| share(g) < *t).collect()
            }
            MinorityRule::Listed(list) => {
                for &(l, a) in list {
                    if !counts.contains_key(&(l, a)) {
                        bail!(
                            "--minority-groups {l}:{a}: no training sample has label {l} and \
                             attribute {a}; the training groups are {}",
                            counts
                                .keys()
                                .map(|(l, a)| format!("{l}:{a}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                    }
                }
                list.iter().copied().collect()
            }
        };
        let train_groups = counts
            .iter()
            .map(|(&(l, a), &n)| GroupEntry {
                label: l,
                attribute: a,
                count: n,
                share_in_class: share((l, a)),
                minority: minority.contains(&(l, a)),
            })
            .collect();
        Ok(GroupInfo {
            rule: rule.describe(),
            train_groups,
            minority,
            class_names: None,
            attribute_names: None,
        })
    }

    /// True when (label, attribute) is a minority group.
    pub fn is_minority(&self, label: u32, attribute: u32) -> bool {
        self.minority.contains(&(label, attribute))
    }

    /// Each training group's share of the whole training split (the weights of the
    /// training-proportion-weighted accuracy).
    pub fn train_proportions(&self) -> BTreeMap<(u32, u32), f64> {
        let n: usize = self.train_groups.iter().map(|g| g.count).sum();
        self.train_groups
            .iter()
            .map(|g| ((g.label, g.attribute), g.count as f64 / n.max(1) as f64))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_rule_picks_rare_groups_within_their_class() -> Result<()> {
        // Class 0: attribute 0 x8, 1 x2 (share 0.2), 2 x1; class 1: attribute 0 x1, 1 x9.
        let mut l = vec![0; 11];
        let mut a = vec![0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2];
        l.extend([1; 10]);
        a.extend([0, 1, 1, 1, 1, 1, 1, 1, 1, 1]);
        let g = GroupInfo::choose(&l, &a, &MinorityRule::ShareBelow(0.2))?;
        let m: Vec<(u32, u32)> = g.minority.iter().copied().collect();
        // 2/11 = 0.18 < 0.2, 1/11, 1/10 are minority; 8/11 and 9/10 are not.
        assert_eq!(m, vec![(0, 1), (0, 2), (1, 0)]);
        assert_eq!(g.train_groups.len(), 5);
        assert!((g.train_groups[1].share_in_class - 2.0 / 11.0).abs() < 1e-12);
        let p = g.train_proportions();
        assert!((p[&(1, 1)] - 9.0 / 21.0).abs() < 1e-12);
        let g = GroupInfo::choose(&l, &a, &MinorityRule::ShareBelow(0.15))?;
        assert_eq!(g.minority.len(), 2);
        Ok(())
    }

    #[test]
    fn listed_groups_must_exist_and_parse() -> Result<()> {
        assert_eq!(parse_group_list("0:1, 1:0")?, vec![(0, 1), (1, 0)]);
        for bad in ["", "0-1", "a:1", "0:-1"] {
            let e = parse_group_list(bad).expect_err(bad).to_string();
            assert!(e.contains("--minority-groups"), "{e}");
        }
        let g = GroupInfo::choose(&[0, 0, 1], &[0, 1, 1], &MinorityRule::Listed(vec![(0, 1)]))?;
        assert!(g.is_minority(0, 1) && !g.is_minority(1, 1));
        let e = GroupInfo::choose(&[0, 1], &[0, 1], &MinorityRule::Listed(vec![(1, 0)]))
            .expect_err("absent group")
            .to_string();
        assert!(e.contains("1:0") && e.contains("0:0, 1:1"), "{e}");
        Ok(())
    }
}
