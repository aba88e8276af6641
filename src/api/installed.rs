//! Whether the CRDs installed in the cluster hold every field this version of bgjobs writes.
//!
//! Helm applies `crds/` on install only, never on upgrade; an operator upgraded without its CRDs runs against a
//! schema that lacks its newer fields, and the apiserver silently prunes them from every write. What those fields
//! carry is what some guarantees rest on (`previousScheduleTime`: taking back a recurring claim; `unstartedAttempts`:
//! a hand-back that does not spend a retry), so a replica that would lose them refuses to start, naming the fields
//! and the command that installs the CRDs. The other way round, an older replica beside newer CRDs, is fine: fields
//! it does not know are kept, not pruned.

use std::collections::BTreeSet;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::{Api, Client, ResourceExt};

use super::RecurringBackgroundJob;
use crate::error::{Error, Result, api_code};

/// Read each CRD this replica needs (the RecurringBackgroundJob one only with `recurring`) and check that it keeps
/// every field of the one this version generates. A CRD this replica may not read (the chart grants it only in
/// cluster mode: in namespace mode it creates no cluster-scoped object) is only warned about: the check is a safety
/// net, not a requirement. A read that fails in a way that may pass is tried again
/// ([`crate::client::at_start_up`]) before the replica gives up.
pub async fn check(client: &Client, recurring: bool) -> Result<()> {
    use kube::Resource;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let needed =
        super::crds().into_iter().filter(|c| recurring || c.spec.names.kind != RecurringBackgroundJob::kind(&()));
    let verdicts = futures::future::try_join_all(needed.map(|wanted| outdated(&crds, wanted, recurring))).await?;
    let outdated: Vec<String> = verdicts.into_iter().flatten().collect();
    if outdated.is_empty() { Ok(()) } else { Err(Error::CrdOutdated(outdated.join("; "))) }
}

/// What is wrong with the installed CRD named as `wanted` (`None`: nothing, or it may not be read).
async fn outdated(
    crds: &Api<CustomResourceDefinition>,
    wanted: CustomResourceDefinition,
    recurring: bool,
) -> Result<Option<String>> {
    let name = wanted.name_any();
    let what = format!("read the CRD {name}");
    let read = crate::client::at_start_up(&what, || async {
        // Absent only when its `Status` says so ([`crate::error::gone`]): a bare 404 is an apiserver not serving yet.
        match crds.get(&name).await {
            Ok(found) => Ok(Some(Some(found))),
            Err(e) if crate::error::gone(&e) => Ok(Some(None)),
            Err(e) if api_code(&e) == Some(403) => Ok(None),
            Err(e) => Err(Error::from(e)),
        }
    });
    let Some(installed) = read.await? else {
        tracing::warn!(
            crd = %name,
            "may not read the CRD (get customresourcedefinitions), so cannot check that it has every field of this \
             version's schema; apply this release's CRDs before upgrading the operator"
        );
        return Ok(None);
    };
    let Some(installed) = installed else {
        let off = if recurring { " (or run the operator with --recurring-enabled=false)" } else { "" };
        return Ok(Some(format!("{name} is not installed{off}")));
    };
    let missing = missing_fields(&installed, &wanted);
    Ok((!missing.is_empty()).then(|| format!("{name} lacks {}", missing.into_iter().collect::<Vec<_>>().join(", "))))
}

/// The fields of `wanted` (the CRD this version generates) that `installed` would prune, as dotted paths under each
/// version of the schema (`v1alpha1: status.previousScheduleTime`); a version `installed` does not serve counts
/// whole. A node of `installed` that keeps unknown fields (`x-kubernetes-preserve-unknown-fields`) keeps every field
/// it does not list.
pub fn missing_fields(installed: &CustomResourceDefinition, wanted: &CustomResourceDefinition) -> BTreeSet<String> {
    let mut missing = BTreeSet::new();
    for version in &wanted.spec.versions {
        let schema = |crd: &CustomResourceDefinition| {
            crd.spec
                .versions
                .iter()
                .find(|v| v.name == version.name && v.served)
                .map(|v| v.schema.as_ref().and_then(|s| s.open_api_v3_schema.clone()).unwrap_or_default())
        };
        let (Some(have), Some(want)) = (schema(installed), schema(wanted)) else {
            missing.insert(format!("{} (not served)", version.name));
            continue;
        };
        let mut paths = BTreeSet::new();
        unkept(&have, &want, "", &mut paths);
        missing.extend(paths.into_iter().map(|p| format!("{}: {p}", version.name)));
    }
    missing
}

/// The paths under `want` that `have` does not keep, added to `out` (`at` is the path so far). A field `have` does
/// not list is kept when `have` keeps unknown fields (`x-kubernetes-preserve-unknown-fields`) or takes any key
/// (`additionalProperties`); one it lists is checked below. A node that wants unknown fields kept, where `have`
/// would prune them, is missing too.
fn unkept(have: &JSONSchemaProps, want: &JSONSchemaProps, at: &str, out: &mut BTreeSet<String>) {
    let keeps_unknown = |node: &JSONSchemaProps| node.x_kubernetes_preserve_unknown_fields == Some(true);
    let any_key = matches!(have.additional_properties, Some(JSONSchemaPropsOrBool::Schema(_)));
    if keeps_unknown(want) && !keeps_unknown(have) && !any_key {
        out.insert(if at.is_empty() { "(unknown fields)".into() } else { format!("{at} (unknown fields)") });
    }
    for (field, wanted) in want.properties.iter().flatten() {
        let path = if at.is_empty() { field.clone() } else { format!("{at}.{field}") };
        match have.properties.as_ref().and_then(|p| p.get(field)) {
            Some(kept) => unkept(kept, wanted, &path, out),
            None if keeps_unknown(have) || any_key => {}
            None => {
                out.insert(path);
            }
        }
    }
    if let (Some(JSONSchemaPropsOrArray::Schema(have)), Some(JSONSchemaPropsOrArray::Schema(want))) =
        (&have.items, &want.items)
    {
        unkept(have, want, &format!("{at}[]"), out);
    }
    if let (Some(JSONSchemaPropsOrBool::Schema(have)), Some(JSONSchemaPropsOrBool::Schema(want))) =
        (&have.additional_properties, &want.additional_properties)
    {
        unkept(have, want, &format!("{at}.*"), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BackgroundJob, RecurringBackgroundJob};
    use kube::CustomResourceExt;

    /// The generated CRD with the field at `path` (dotted, under the first version's schema) removed.
    fn without(mut crd: CustomResourceDefinition, path: &str) -> CustomResourceDefinition {
        let schema = crd.spec.versions[0].schema.as_mut().unwrap().open_api_v3_schema.as_mut().unwrap();
        let (parents, field) = path.rsplit_once('.').map_or(("", path), |(p, f)| (p, f));
        let mut node = schema;
        for part in parents.split('.').filter(|p| !p.is_empty()) {
            node = node.properties.as_mut().unwrap().get_mut(part).unwrap();
        }
        assert!(node.properties.as_mut().unwrap().remove(field).is_some(), "{path} is in the generated CRD");
        crd
    }

    #[test]
    fn the_generated_crds_miss_nothing() {
        for crd in crate::api::crds() {
            assert_eq!(missing_fields(&crd, &crd), BTreeSet::new(), "{}", crd.name_any());
        }
    }

    #[test]
    fn a_crd_from_before_a_status_field_is_found_to_lack_it_with_its_path() {
        let wanted = RecurringBackgroundJob::crd();
        let old = without(wanted.clone(), "status.previousScheduleTime");
        assert_eq!(missing_fields(&old, &wanted), BTreeSet::from(["v1alpha1: status.previousScheduleTime".into()]));
        let wanted = BackgroundJob::crd();
        let old = without(without(wanted.clone(), "status.unstartedAttempts"), "spec.retry.backoffFactor");
        let expected = ["v1alpha1: spec.retry.backoffFactor", "v1alpha1: status.unstartedAttempts"];
        assert_eq!(missing_fields(&old, &wanted), expected.into_iter().map(String::from).collect());
        // A whole missing object is named once, not field by field.
        let old = without(wanted.clone(), "status");
        assert_eq!(missing_fields(&old, &wanted), BTreeSet::from(["v1alpha1: status".into()]));
    }

    #[test]
    fn a_newer_crd_with_more_fields_misses_nothing_and_a_node_keeping_unknown_fields_keeps_everything_below() {
        let wanted = BackgroundJob::crd();
        let older_operator = without(wanted.clone(), "status.unstartedAttempts");
        assert_eq!(missing_fields(&wanted, &older_operator), BTreeSet::new(), "extra fields are kept");
        let mut loose = without(without(wanted.clone(), "status.unstartedAttempts"), "status.progress.percent");
        let status = |crd: &mut CustomResourceDefinition| {
            let schema = crd.spec.versions[0].schema.as_mut().unwrap().open_api_v3_schema.as_mut().unwrap();
            let status = schema.properties.as_mut().unwrap().get_mut("status").unwrap();
            status.x_kubernetes_preserve_unknown_fields = Some(true);
        };
        status(&mut loose);
        // `status` keeps what it does not list; `progress`, which it lists, still prunes what it does not.
        let expected = BTreeSet::from(["v1alpha1: status.progress.percent".to_string()]);
        assert_eq!(missing_fields(&loose, &wanted), expected);
        // A schema that now keeps unknown fields where the installed one pruned them.
        let mut newer = wanted.clone();
        status(&mut newer);
        let expected = BTreeSet::from(["v1alpha1: status (unknown fields)".to_string()]);
        assert_eq!(missing_fields(&wanted, &newer), expected);
    }

    #[test]
    fn a_crd_that_does_not_serve_the_version_misses_it_whole() {
        let wanted = BackgroundJob::crd();
        let mut old = wanted.clone();
        old.spec.versions[0].name = "v1alpha0".into();
        assert_eq!(missing_fields(&old, &wanted), BTreeSet::from(["v1alpha1 (not served)".into()]));
        let mut unserved = wanted.clone();
        unserved.spec.versions[0].served = false;
        assert_eq!(missing_fields(&unserved, &wanted), BTreeSet::from(["v1alpha1 (not served)".into()]));
    }
}
