//! moto's APIs as the stack test reads them: query (XML) and JSON protocols, and
//! creating a stack and listing its resources.

use super::*;

// --- moto ----------------------------------------------------------------------------

/// Plain AWS API calls to moto: query (form in, XML out) and JSON 1.1 protocols.
pub(super) struct Api {
    http: reqwest::Client,
    endpoint: String,
}

impl Api {
    pub(super) fn new(moto: &Moto) -> Self {
        Self {
            http: reqwest::Client::new(),
            endpoint: moto.endpoint(),
        }
    }

    /// moto reads the service and Region from the credential scope; it does not
    /// check the signature.
    pub(super) fn auth(service: &str) -> String {
        format!(
            "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=0"
        )
    }

    pub(super) async fn query(
        &self,
        service: &str,
        version: &str,
        action: &str,
        params: &[(String, String)],
    ) -> String {
        let mut form: Vec<(String, String)> = vec![
            ("Action".into(), action.into()),
            ("Version".into(), version.into()),
        ];
        form.extend_from_slice(params);
        let answer = self
            .http
            .post(&self.endpoint)
            .header("Authorization", Self::auth(service))
            .form(&form)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{service} {action}: {e}"));
        let status = answer.status();
        let body = answer.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "{service} {action} answered {status}: {body}"
        );
        body
    }

    pub(super) async fn json(
        &self,
        service: &str,
        target: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let answer = self
            .http
            .post(&self.endpoint)
            .header("Authorization", Self::auth(service))
            .header("X-Amz-Target", target)
            .header("Content-Type", "application/x-amz-json-1.1")
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{target}: {e}"));
        let status = answer.status();
        let text = answer.text().await.unwrap_or_default();
        assert!(status.is_success(), "{target} answered {status}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{target}: not JSON ({e}): {text}"))
    }
}

/// The text of every element named `name`, in document order.
pub(super) fn xml_all(xml: &str, name: &str) -> Vec<String> {
    let doc = roxmltree::Document::parse(xml).unwrap_or_else(|e| panic!("not XML ({e}): {xml}"));
    doc.descendants()
        .filter(|n| n.tag_name().name() == name)
        .map(|n| n.text().unwrap_or_default().to_owned())
        .collect()
}

pub(super) fn xml_one(xml: &str, name: &str) -> String {
    xml_all(xml, name)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no <{name}> in {xml}"))
}

/// Each `member` element under a list, as a map of its direct children's text.
pub(super) fn xml_members(xml: &str, list: &str) -> Vec<BTreeMap<String, String>> {
    let doc = roxmltree::Document::parse(xml).unwrap_or_else(|e| panic!("not XML ({e}): {xml}"));
    doc.descendants()
        .filter(|n| n.tag_name().name() == list)
        .flat_map(|l| l.children().filter(|c| c.tag_name().name() == "member"))
        .map(|m| {
            m.children()
                .filter(roxmltree::Node::is_element)
                .map(|c| {
                    (
                        c.tag_name().name().to_owned(),
                        c.text().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .collect()
}

/// Creates the template as stack `name` with these parameters in moto, waits for it,
/// and returns DescribeStacks' answer and the stack's outputs.
pub(super) async fn create_stack(
    api: &Api,
    name: &str,
    parameters: &[(&str, String)],
) -> (String, BTreeMap<String, String>) {
    let body = std::fs::read_to_string(workspace_root().join(TEMPLATE))
        .unwrap_or_else(|e| panic!("cannot read {TEMPLATE}: {e}"));
    let mut params: Vec<(String, String)> = vec![
        ("StackName".into(), name.into()),
        ("TemplateBody".into(), body),
        ("Capabilities.member.1".into(), "CAPABILITY_IAM".into()),
    ];
    for (i, (key, value)) in parameters.iter().enumerate() {
        params.push((
            format!("Parameters.member.{}.ParameterKey", i + 1),
            (*key).to_owned(),
        ));
        params.push((
            format!("Parameters.member.{}.ParameterValue", i + 1),
            value.clone(),
        ));
    }
    let cfn = "2010-05-15";
    api.query("cloudformation", cfn, "CreateStack", &params)
        .await;
    let stack = [("StackName".to_owned(), name.to_owned())];
    let (status, described) = wait_for(
        "the stack to finish creating",
        Duration::from_secs(60),
        || async {
            let answer = api
                .query("cloudformation", cfn, "DescribeStacks", &stack)
                .await;
            let status = xml_one(&answer, "StackStatus");
            (!status.ends_with("IN_PROGRESS")).then_some((status, answer))
        },
    )
    .await;
    assert_eq!(
        status, "CREATE_COMPLETE",
        "{name} did not create: {described}"
    );
    let outputs: BTreeMap<String, String> = xml_members(&described, "Outputs")
        .into_iter()
        .filter_map(|m| Some((m.get("OutputKey")?.clone(), m.get("OutputValue")?.clone())))
        .collect();
    (described, outputs)
}

/// The logical id → (type, physical id) of a stack's resources in moto.
pub(super) async fn stack_resources(api: &Api, name: &str) -> BTreeMap<String, (String, String)> {
    let stack = [("StackName".to_owned(), name.to_owned())];
    let listed = api
        .query(
            "cloudformation",
            "2010-05-15",
            "DescribeStackResources",
            &stack,
        )
        .await;
    xml_members(&listed, "StackResources")
        .into_iter()
        .filter_map(|m| {
            let id = m.get("LogicalResourceId")?.clone();
            Some((
                id,
                (
                    m.get("ResourceType")?.clone(),
                    m.get("PhysicalResourceId")?.clone(),
                ),
            ))
        })
        .collect()
}

/// Whether an IAM resource pattern with `*` wildcards matches `arn`.
pub(super) fn arn_matches(pattern: &str, arn: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
        return false;
    };
    if !arn.starts_with(first) || !arn.ends_with(last) || arn.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &arn[first.len()..arn.len() - last.len()];
    for middle in &parts[1..parts.len().saturating_sub(1)] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    parts.len() > 1 || arn == pattern
}

/// The `Name`/`Value` pairs of an ECS container's environment.
pub(super) fn ecs_environment(container: &serde_json::Value) -> BTreeMap<String, String> {
    container["environment"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .collect()
}
