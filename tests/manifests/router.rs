//! The group snapshot router (container snapshot-router, `loopcsi route-snapshots`): the
//! driver's image, a command line the binary accepts, the driver's socket, the node's name, no
//! privilege, and the RBAC it needs (docs/kubernetes.md, "Group snapshots").

use serde_json::Value;

use super::*;
use loopcsi::config::RouteArgs;

const ROUTER: &str = "snapshot-router";

/// Parses the router container's command line with loopcsi's own parser (NODE_ID from the
/// downward API gets a stand-in).
fn router_args(router: &Value) -> RouteArgs {
    let mut argv: Vec<String> = vec!["loopcsi".into()];
    argv.extend(
        array(&router["args"])
            .iter()
            .map(|a| a.as_str().unwrap().to_owned()),
    );
    argv.push("--node-id=node-a".into());
    match Cli::try_parse_from(&argv) {
        Ok(Cli {
            command: CliCommand::RouteSnapshots(args),
        }) => args,
        Ok(other) => panic!("{ROUTER} must run `loopcsi route-snapshots`, runs {other:?}"),
        Err(e) => panic!("the router's args {argv:?} do not parse: {e}"),
    }
}

#[test]
fn the_router_runs_the_driver_image_on_the_drivers_socket_with_the_rbac_it_needs() {
    let objects = render(&deploy().join("base"));
    let spec = pod_spec(object(&objects, "DaemonSet", DAEMONSET)).unwrap();
    let (driver, router) = (container(spec, DRIVER), container(spec, ROUTER));
    assert_eq!(
        router["image"], driver["image"],
        "one image: the router is the driver's binary"
    );

    let args = router_args(router);
    args.validate()
        .unwrap_or_else(|e| panic!("the router's flags are invalid: {e}"));
    let config = driver_config(driver);
    assert_eq!(
        args.driver_name, config.driver_name,
        "the router routes the driver's objects"
    );
    assert_eq!(
        host_path(spec, router, args.socket_path().unwrap().to_str().unwrap()),
        host_path(
            spec,
            driver,
            config.socket_path().unwrap().to_str().unwrap()
        ),
        "the router asks the driver on its own socket"
    );
    assert_field_ref(router, "NODE_ID", "spec.nodeName");
    assert!(
        router["securityContext"]["privileged"].is_null()
            && router["securityContext"]["allowPrivilegeEscalation"] == false,
        "the router needs no privilege: {}",
        router["securityContext"]
    );

    let (cluster, _) = grants(&objects);
    for (group, resource, verbs) in [
        (
            "snapshot.storage.k8s.io",
            "volumesnapshotcontents",
            &["get", "list", "watch", "patch"][..],
        ),
        (
            "groupsnapshot.storage.k8s.io",
            "volumegroupsnapshotcontents",
            &["get", "list", "watch", "patch"][..],
        ),
        (
            "groupsnapshot.storage.k8s.io",
            "volumegroupsnapshotclasses",
            &["get", "list", "watch", "patch"][..],
        ),
        ("events.k8s.io", "events", &["create", "patch"][..]),
    ] {
        let have = cluster
            .get(&(group.into(), resource.into()))
            .cloned()
            .unwrap_or_default();
        for verb in verbs {
            assert!(
                have.contains(*verb),
                "the router may not {verb} {resource} ({group})"
            );
        }
    }
    // Its own role grants exactly that: nothing to write but labels, no secrets, no deletes.
    let role = object(&objects, "ClusterRole", "loopcsi-snapshot-router");
    let mut own = Grants::new();
    grant(&mut own, role);
    let verbs: BTreeSet<&str> = own.values().flatten().map(String::as_str).collect();
    assert_eq!(
        verbs,
        ["create", "get", "list", "patch", "watch"]
            .into_iter()
            .collect()
    );
    assert_eq!(own.len(), 4, "{own:?}");
}
