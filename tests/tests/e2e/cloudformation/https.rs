//! The template's HTTPS: the listener on 443 with a TLS 1.3 policy when a certificate
//! is given, and port 80 redirecting to it.

use super::*;

/// HTTPS when a certificate is given, HTTP as before when not: a 443 listener with
/// a TLS 1.3 policy and the certificate, a rule that sends every request on port 80
/// there, port 443 open on the ALB's security group, all under one condition; and
/// port 80 forwarding to the service by default, so the target group always belongs
/// to the load balancer before the service starts.
pub(super) fn check_https(
    template: &Value,
    res: &BTreeMap<String, Value>,
    tg_id: &str,
    problems: &mut Vec<String>,
) {
    let param = at(template, "Parameters.CertificateArn");
    if param.and_then(|p| text_at(p, "Default")).as_deref() != Some("") {
        problems.push("no CertificateArn parameter with an empty default (HTTP only)".into());
    }
    let condition = "HasCertificate";
    let cond = format!("{:?}", at(template, &format!("Conditions.{condition}")));
    if !cond.contains("CertificateArn") {
        problems.push(format!(
            "no condition {condition} on CertificateArn: {cond}"
        ));
    }
    let get = |id: &str| res.get(id);
    let forward_to = |listener: &Value| {
        at(listener, "Properties.DefaultActions")
            .and_then(Value::as_sequence)
            .and_then(|a| a.first())
            .map(|a| (text_at(a, "Type"), rendered(a.get("TargetGroupArn"))))
    };
    let forward = Some((Some("forward".to_owned()), format!("!Ref {tg_id}")));
    match get("HttpListener") {
        Some(l)
            if text_at(l, "Condition").is_none()
                && number(at(l, "Properties.Port")) == Some(80)
                && forward_to(l) == forward => {}
        other => problems.push(format!(
            "HttpListener must always exist on port 80 and forward to {tg_id}: {other:?}"
        )),
    }
    match get("HttpsListener") {
        Some(l) => {
            let p = |key: &str| text_at(l, &format!("Properties.{key}"));
            let certs = at(l, "Properties.Certificates")
                .and_then(Value::as_sequence)
                .map(|c| {
                    c.iter()
                        .map(|c| rendered(c.get("CertificateArn")))
                        .collect::<Vec<_>>()
                });
            if text_at(l, "Condition").as_deref() != Some(condition)
                || p("Protocol").as_deref() != Some("HTTPS")
                || number(at(l, "Properties.Port")) != Some(443)
                || !p("SslPolicy").is_some_and(|s| TLS13_POLICIES.contains(&s.as_str()))
                || certs != Some(vec!["!Ref CertificateArn".to_owned()])
                || forward_to(l) != forward
            {
                problems.push(format!(
                    "HttpsListener must be HTTPS on 443 with a TLS 1.3 policy and !Ref CertificateArn, forwarding to {tg_id}, under {condition}: {l:?}"
                ));
            }
        }
        None => problems.push("no HttpsListener".into()),
    }
    let redirect = res.iter().find(|(_, r)| {
        text_at(r, "Type").as_deref() == Some("AWS::ElasticLoadBalancingV2::ListenerRule")
            && rendered(at(r, "Properties.ListenerArn")) == "!Ref HttpListener"
    });
    match redirect {
        Some((_, rule)) => {
            let action = at(rule, "Properties.Actions")
                .and_then(Value::as_sequence)
                .and_then(|a| a.first());
            let config =
                |key: &str| action.and_then(|a| text_at(a, &format!("RedirectConfig.{key}")));
            let paths = format!("{:?}", at(rule, "Properties.Conditions"));
            if text_at(rule, "Condition").as_deref() != Some(condition)
                || action.and_then(|a| text_at(a, "Type")).as_deref() != Some("redirect")
                || config("Protocol").as_deref() != Some("HTTPS")
                || config("Port").as_deref() != Some("443")
                || config("StatusCode").as_deref() != Some("HTTP_301")
                || !paths.contains("\"/*\"")
            {
                problems.push(format!(
                    "the port 80 rule must redirect every path to HTTPS on 443 (301) under {condition}: {rule:?}"
                ));
            }
        }
        None => problems.push("no rule on HttpListener redirects to HTTPS".into()),
    }
    let opens_443 = res.values().any(|r| {
        text_at(r, "Type").as_deref() == Some("AWS::EC2::SecurityGroupIngress")
            && text_at(r, "Condition").as_deref() == Some(condition)
            && rendered(at(r, "Properties.GroupId")) == "!GetAtt LoadBalancerSecurityGroup.GroupId"
            && number(at(r, "Properties.FromPort")) == Some(443)
            && number(at(r, "Properties.ToPort")) == Some(443)
    });
    if !opens_443 {
        problems.push(format!(
            "no ingress rule opens 443 on the ALB's security group under {condition}"
        ));
    }
}
