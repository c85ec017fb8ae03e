//! The Kubernetes manifests of `deploy/kubernetes/`: parsed by PyYAML (duplicate keys refused)
//! and every field checked against the Kubernetes API models of Debian's python3-kubernetes (no
//! cluster needed: kubectl's validation needs an API server, kubeconform is not packaged); the
//! ServiceMonitor (a CRD, not in those models) against its documented fields.
//!
//! A missing tool fails the test and names the Debian package that brings it (`cargo +stable
//! xtask setup` installs them). Nothing here needs root or the network.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
};

use serde_json::Value;
use twtrace_tests::deploy::{CONTAINER_ARGV, IMAGE_USER, combined, deploy, expected_caps, output};

/// Parses YAML files with PyYAML (duplicate keys refused) and checks each document whose kind
/// the Kubernetes API models of python3-kubernetes know: every field name, every scalar type,
/// every list and map, and the required fields. Prints JSON: the documents of each file, the
/// errors, and the kinds it had no model for.
const K8S_CHECK: &str = r#"
import json, sys
try:
    import yaml
except ImportError:
    print(json.dumps({"missing": "python3-yaml"})); sys.exit(0)
try:
    import kubernetes.client as models
except ImportError:
    print(json.dumps({"missing": "python3-kubernetes"})); sys.exit(0)

class Strict(yaml.SafeLoader):
    pass

def mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, "duplicate key %r" % (key,), key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)

Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)

# Resource quantities are strings in the models, numbers are fine in YAML ("cpu: 1").
QUANTITY_MAPS = {"limits", "requests"}
errors = []

def check(value, typ, path, parent_key=None):
    if typ.startswith("list["):
        if not isinstance(value, list):
            errors.append("%s: expected a list (%s), got %r" % (path, typ, value)); return
        for i, item in enumerate(value):
            check(item, typ[5:-1], "%s[%d]" % (path, i))
        return
    if typ.startswith("dict("):
        inner = typ[5:-1].split(", ", 1)[1]
        if not isinstance(value, dict):
            errors.append("%s: expected a map (%s), got %r" % (path, typ, value)); return
        for k, v in value.items():
            if not isinstance(k, str):
                errors.append("%s: key %r is not a string" % (path, k))
            check(v, inner, "%s.%s" % (path, k), path.rsplit(".", 1)[-1])
        return
    if typ == "object":
        return
    if typ in ("str", "datetime", "date"):
        ok = isinstance(value, str) or (
            parent_key in QUANTITY_MAPS and isinstance(value, (int, float))
            and not isinstance(value, bool))
    elif typ == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif typ == "bool":
        ok = isinstance(value, bool)
    else:
        cls = getattr(models, typ, None)
        if cls is None:
            errors.append("%s: no model %s" % (path, typ)); return
        if not isinstance(value, dict):
            errors.append("%s: expected an object (%s), got %r" % (path, typ, value)); return
        by_json = {v: k for k, v in cls.attribute_map.items()}
        kwargs = {}
        for k, v in value.items():
            if k not in by_json:
                errors.append("%s: unknown field %r in %s (known: %s)"
                              % (path, k, typ, ", ".join(sorted(by_json))))
                continue
            kwargs[by_json[k]] = v
            check(v, cls.openapi_types[by_json[k]], "%s.%s" % (path, k))
        try:
            cls(**kwargs)  # required fields and allowed values
        except (ValueError, TypeError) as e:
            errors.append("%s: %s" % (path, e))
        return
    if not ok:
        errors.append("%s: expected %s, got %r" % (path, typ, value))

out = {"files": {}, "unchecked": []}
for path in sys.argv[1:]:
    try:
        with open(path) as f:
            docs = [d for d in yaml.load_all(f, Loader=Strict) if d is not None]
    except yaml.YAMLError as e:
        errors.append("%s: %s" % (path, e)); continue
    out["files"][path] = docs
    for i, doc in enumerate(docs):
        where = "%s#%d" % (path, i)
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            errors.append("%s: not a Kubernetes object" % where); continue
        version = str(doc["apiVersion"]).split("/")[-1]
        model = version[:1].upper() + version[1:] + str(doc["kind"])
        if getattr(models, model, None) is None:
            out["unchecked"].append("%s %s" % (doc["apiVersion"], doc["kind"])); continue
        check(doc, model, "%s(%s)" % (where, doc["kind"]))
out["errors"] = errors
print(json.dumps(out, default=str))
"#;

struct K8s {
    /// file name -> its documents
    files: BTreeMap<String, Vec<Value>>,
}

impl K8s {
    fn load() -> Self {
        // Debian's interpreter: the modules come from Debian's packages.
        let python = Path::new("/usr/bin/python3");
        assert!(
            python.is_file(),
            "/usr/bin/python3 is missing: install Debian's `python3`, `python3-yaml` and \
             `python3-kubernetes` packages (`cargo +stable xtask setup` does it)"
        );
        let dir = deploy().join("kubernetes");
        let names = ["daemonset.yaml", "servicemonitor.yaml"];
        let out = output(
            Command::new(python)
                .arg("-c")
                .arg(K8S_CHECK)
                .args(names.map(|n| dir.join(n)))
                // The user's site-packages must not stand in for Debian's.
                .env("PYTHONNOUSERSITE", "1"),
        );
        assert!(
            out.status.success(),
            "the YAML checker failed: {}",
            combined(&out)
        );
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("checker output is not JSON ({e}): {}", combined(&out)));
        if let Some(pkg) = v["missing"].as_str() {
            panic!(
                "Python module missing: install Debian's `{pkg}` package (`apt-get install -y \
                 {pkg}`; `cargo +stable xtask setup` does it)"
            );
        }
        let errors: Vec<&str> = v["errors"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            errors.is_empty(),
            "Kubernetes manifests:\n{}",
            errors.join("\n")
        );
        // Only the CRD is left to our own checks.
        let unchecked: Vec<&str> = v["unchecked"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(unchecked, ["monitoring.coreos.com/v1 ServiceMonitor"]);
        let files = v["files"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(path, docs)| {
                let name = Path::new(path)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                (name, docs.as_array().unwrap().clone())
            })
            .collect();
        K8s { files }
    }

    fn doc(&self, file: &str, kind: &str) -> &Value {
        let docs: Vec<&Value> = self.files[file]
            .iter()
            .filter(|d| d["kind"] == kind)
            .collect();
        assert_eq!(docs.len(), 1, "{file}: exactly one {kind}");
        docs[0]
    }
}

/// The documentation of one field of a Kubernetes API model, as python3-kubernetes has it (the
/// API's own field descriptions).
fn model_doc(model: &str, field: &str) -> String {
    let out = output(
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(format!(
                "import kubernetes.client as m; print(m.{model}.{field}.__doc__)"
            ))
            .env("PYTHONNOUSERSITE", "1"),
    );
    assert!(out.status.success(), "{model}.{field}: {}", combined(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap_or_else(|| panic!("not a string: {s}")))
        .collect()
}

#[test]
fn kubernetes_manifests_match_the_api_and_each_other() {
    let k = K8s::load();
    let kinds: Vec<&str> = k.files["daemonset.yaml"]
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["Namespace", "ServiceAccount", "DaemonSet", "Service"]
    );

    let ns = k.doc("daemonset.yaml", "Namespace");
    let namespace = ns["metadata"]["name"].as_str().unwrap();
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
        "hostPID/hostNetwork/hostPath need the privileged Pod Security level"
    );
    for doc in k.files.values().flatten() {
        if doc["kind"] != "Namespace" {
            assert_eq!(doc["metadata"]["namespace"], namespace, "{}", doc["kind"]);
        }
    }
    let sa = k.doc("daemonset.yaml", "ServiceAccount");
    assert_eq!(sa["automountServiceAccountToken"], false);

    // DaemonSet
    let ds = k.doc("daemonset.yaml", "DaemonSet");
    assert_eq!(ds["apiVersion"], "apps/v1");
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (key, value) in ds["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &pod_labels[key], value,
            "the selector matches the pod template"
        );
    }
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists"
                && t.get("key").is_none()
                && t.get("effect").is_none()),
        "a toleration of every taint: on every node"
    );
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9979");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let mut argv = strings(&c["command"]);
    argv.extend(strings(&c["args"]));
    // The images' command line, with nobody by number: what the image `xtask dist` builds
    // runs by default, and what the Dockerfile's image (which knows `nobody`) accepts as well.
    let want: Vec<&str> = CONTAINER_ARGV.iter().chain(&IMAGE_USER).copied().collect();
    assert_eq!(argv, want);
    let sc = &c["securityContext"];
    assert_eq!(
        sc["runAsUser"], 0,
        "twtrace starts as root and drops to nobody itself"
    );
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_ne!(sc["privileged"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    let added: BTreeSet<String> = strings(&sc["capabilities"]["add"])
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(added, expected_caps(), "capabilities.add");
    // The API (the models' own documentation) says allowPrivilegeEscalation "is true always
    // when the container is: 1) run as Privileged 2) has CAP_SYS_ADMIN", and its validation
    // refuses false with either (the CAP_ spelling; SYS_ADMIN slips through, a known bug).
    // With SYS_ADMIN added, the manifest says true, as the API takes it anyway: twtrace sets
    // no_new_privs itself in both of its processes.
    let doc = model_doc("V1SecurityContext", "allow_privilege_escalation");
    assert!(
        doc.contains("is true always when the container is") && doc.contains("CAP_SYS_ADMIN"),
        "the API no longer documents allowPrivilegeEscalation as true with CAP_SYS_ADMIN: {doc}"
    );
    assert!(added.contains("SYS_ADMIN"));
    assert_eq!(
        sc["allowPrivilegeEscalation"], true,
        "allowPrivilegeEscalation with SYS_ADMIN: true (the API's rule)"
    );
    assert_eq!(c["resources"]["requests"]["memory"], "64Mi");
    assert_eq!(c["resources"]["limits"]["memory"], "128Mi");
    assert_eq!(c["resources"]["requests"]["cpu"], "50m");
    assert_eq!(c["resources"]["limits"]["cpu"], "200m");

    let port_named = |name: &Value| -> u64 {
        if let Some(n) = name.as_u64() {
            return n;
        }
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == *name)
            .unwrap_or_else(|| panic!("no container port named {name}"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], "/healthz", "{probe}");
        assert_eq!(port_named(&get["port"]), 9979, "{probe}");
    }

    // Host paths, read-only, where twtrace looks for them: the kernel's BTF and nothing else
    // (no tracefs).
    let btf = "/sys/kernel/btf";
    let volumes = pod["volumes"].as_array().unwrap();
    let mounts = c["volumeMounts"].as_array().unwrap();
    assert_eq!(volumes.len(), 1, "one volume, {btf}: {volumes:?}");
    assert_eq!(mounts.len(), 1, "one volume mount, {btf}: {mounts:?}");
    assert_eq!(volumes[0]["hostPath"]["path"], btf, "the hostPath volume");
    assert_eq!(
        mounts[0]["name"], volumes[0]["name"],
        "the volume is mounted"
    );
    assert_eq!(mounts[0]["mountPath"], btf);
    assert_eq!(mounts[0]["readOnly"], true, "{btf} is mounted read-only");

    // The headless Service selects the pods and names the port the ServiceMonitor scrapes.
    let svc = k.doc("daemonset.yaml", "Service");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    for (key, value) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&pod_labels[key], value, "the Service selects the pods");
    }
    let svc_port = &svc["spec"]["ports"][0];
    assert_eq!(svc_port["port"], 9979);
    assert_eq!(port_named(&svc_port["targetPort"]), 9979);

    // ServiceMonitor: its selector finds the Service, its endpoint the named port, and the job
    // label (the Service's name) matches TwtraceDown's up{job=~"twtrace.*"}.
    let sm = k.doc("servicemonitor.yaml", "ServiceMonitor");
    check_service_monitor_fields(sm);
    for (key, value) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &svc["metadata"]["labels"][key], value,
            "the ServiceMonitor selects the Service"
        );
    }
    assert!(strings(&sm["spec"]["namespaceSelector"]["matchNames"]).contains(&namespace));
    let endpoints = sm["spec"]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["port"], svc_port["name"]);
    assert_eq!(endpoints[0]["path"], "/metrics");
    assert!(sm["spec"].get("jobLabel").is_none());
    assert!(
        svc["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("twtrace"),
        "job label = Service name, must match up{{job=~\"twtrace.*\"}}"
    );
}

/// The ServiceMonitor fields this file may use (monitoring.coreos.com/v1, as the Prometheus
/// Operator's API reference documents them): a typo is an unknown key here.
fn check_service_monitor_fields(sm: &Value) {
    fn keys_within(v: &Value, what: &str, allowed: &[&str]) {
        for k in v
            .as_object()
            .unwrap_or_else(|| panic!("{what}: not an object"))
            .keys()
        {
            assert!(
                allowed.contains(&k.as_str()),
                "ServiceMonitor {what}: unknown field {k} (known: {allowed:?})"
            );
        }
    }
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    keys_within(sm, "", &["apiVersion", "kind", "metadata", "spec"]);
    keys_within(
        &sm["metadata"],
        "metadata",
        &["name", "namespace", "labels", "annotations"],
    );
    keys_within(
        &sm["spec"],
        "spec",
        &[
            "selector",
            "namespaceSelector",
            "endpoints",
            "jobLabel",
            "targetLabels",
            "podTargetLabels",
            "sampleLimit",
            "targetLimit",
            "labelLimit",
            "labelNameLengthLimit",
            "labelValueLengthLimit",
            "attachMetadata",
            "keepDroppedTargets",
            "scrapeProtocols",
            "scrapeClass",
            "bodySizeLimit",
        ],
    );
    keys_within(
        &sm["spec"]["selector"],
        "selector",
        &["matchLabels", "matchExpressions"],
    );
    keys_within(
        &sm["spec"]["namespaceSelector"],
        "namespaceSelector",
        &["any", "matchNames"],
    );
    for ep in sm["spec"]["endpoints"].as_array().unwrap() {
        keys_within(
            ep,
            "endpoint",
            &[
                "port",
                "targetPort",
                "path",
                "scheme",
                "params",
                "interval",
                "scrapeTimeout",
                "tlsConfig",
                "bearerTokenFile",
                "bearerTokenSecret",
                "authorization",
                "honorLabels",
                "honorTimestamps",
                "trackTimestampsStaleness",
                "basicAuth",
                "oauth2",
                "metricRelabelings",
                "relabelings",
                "proxyUrl",
                "followRedirects",
                "enableHttp2",
                "filterRunning",
            ],
        );
        for relabel in ["relabelings", "metricRelabelings"] {
            for r in ep[relabel]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                keys_within(
                    r,
                    relabel,
                    &[
                        "sourceLabels",
                        "separator",
                        "targetLabel",
                        "regex",
                        "modulus",
                        "replacement",
                        "action",
                    ],
                );
            }
        }
        for key in ["interval", "scrapeTimeout"] {
            if let Some(d) = ep[key].as_str() {
                let digits = d.trim_end_matches(|c: char| c.is_ascii_alphabetic());
                assert!(
                    !digits.is_empty()
                        && digits.chars().all(|c| c.is_ascii_digit())
                        && ["ms", "s", "m", "h"].contains(&&d[digits.len()..]),
                    "ServiceMonitor {key}: {d} is not a Prometheus duration"
                );
            }
        }
    }
}
