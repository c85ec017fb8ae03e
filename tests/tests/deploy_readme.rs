//! deploy/README.md, read against what the deployments do: its capability table lists the one
//! capability set every deployment grants (and says which of them the collector process keeps),
//! and it explains every alert of the Prometheus rules.
//! Nothing here needs a tool, root or the network.

use std::collections::BTreeSet;

use twtrace_tests::deploy::{COLLECTOR_CAPS, deploy, expected_caps, read, rules};

/// The README's capability table lists exactly the capabilities granted, each with its reason
/// (the collector's own saying that `twtrace-collector` keeps it, no other saying so), and
/// every alert is explained.
#[test]
fn readme_explains_every_capability_and_alert() {
    let readme = read(&deploy().join("README.md"));
    let mut table = BTreeSet::new();
    for line in readme
        .lines()
        .skip_while(|l| !l.starts_with("| capability | why |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
    {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert!(
            cells.len() >= 4 && !cells[2].is_empty(),
            "deploy/README.md: capability row without a reason: {line}"
        );
        for cap in cells[1].split(',') {
            let name = cap
                .trim()
                .strip_prefix("`CAP_")
                .and_then(|c| c.strip_suffix('`'))
                .unwrap_or_else(|| panic!("deploy/README.md: not a `CAP_*` name: {cap}"));
            assert!(
                table.insert(name.to_owned()),
                "deploy/README.md: {name} twice"
            );
            assert_eq!(
                cells[2].contains("`twtrace-collector`"),
                COLLECTOR_CAPS.contains(&name),
                "deploy/README.md: does the collector process keep {name}? {line}"
            );
        }
    }
    assert_eq!(
        table,
        expected_caps(),
        "deploy/README.md: the capability table"
    );
    for rule in rules() {
        assert!(
            readme.contains(&rule.name),
            "deploy/README.md: {}",
            rule.name
        );
    }
}
