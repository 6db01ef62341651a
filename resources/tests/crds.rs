//! The committed CRD YAML (`crds/` and the Helm chart's copy) must be what the Rust types
//! generate. `THYNAPSE_WRITE_CRDS=1 cargo test -p thynapse-resources --test crds`
//! rewrites them after a change to the types.

use std::path::PathBuf;

#[test]
fn committed_crds_match_the_types() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let write = std::env::var_os("THYNAPSE_WRITE_CRDS").is_some();
    let mut stale = Vec::new();
    for crd in thynapse_resources::crds() {
        let name = crd.metadata.name.clone().expect("CRDs are named");
        let want = thynapse_resources::crd_yaml(&crd);
        for dir in ["crds", "charts/thynapse/crds"] {
            let path = root.join(dir).join(format!("{name}.yaml"));
            if write {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &want).unwrap();
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(want.as_str()) {
                stale.push(path.display().to_string());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "CRD YAML out of date with the Rust types: {stale:?}\nrun: THYNAPSE_WRITE_CRDS=1 cargo test -p thynapse-resources --test crds"
    );
}

#[test]
fn crds_have_the_contract_of_design_md() {
    let crds = thynapse_resources::crds();
    let names: Vec<_> = crds
        .iter()
        .map(|c| {
            (
                c.spec.names.kind.clone(),
                c.spec.names.short_names.clone().unwrap_or_default(),
                c.spec.scope.clone(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            (
                "TransmitterMesh".to_string(),
                vec!["tmesh".to_string()],
                "Namespaced".to_string()
            ),
            (
                "Service".to_string(),
                vec!["tsvc".to_string()],
                "Namespaced".to_string()
            ),
            (
                "Room".to_string(),
                vec!["room".to_string()],
                "Namespaced".to_string()
            ),
        ]
    );
    for crd in &crds {
        assert_eq!(crd.spec.group, "thynapse.io");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(
            v.subresources.as_ref().unwrap().status.is_some(),
            "status subresource"
        );
        assert!(v.additional_printer_columns.as_ref().unwrap().len() >= 3);
    }
    let mesh = serde_json::to_value(&crds[0]).unwrap();
    let spec = &mesh["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["required"], serde_json::json!(["replicas"]));
    assert_eq!(
        spec["properties"]["replicas"]["minimum"].as_f64(),
        Some(1.0)
    );
    assert!(spec["x-kubernetes-validations"].as_array().unwrap().len() == 2);
}
