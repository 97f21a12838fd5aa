//! The service's decision in a DynamoDB table, shared by its tasks.
//!
//! One item per service, keyed by `service` (`<cluster name>/<service name>`):
//! `version` (a number), `record` (the JSON of a [`Record`]), the claim on the next
//! decision (`claim_owner`, `claim_until` in ms), and `expires_at` (epoch seconds, for
//! the table's time to live, so a deleted service's item goes away by itself).
//! Reads are eventually consistent `GetItem`s (half a read unit each); a claim is an
//! `UpdateItem` and a publication a `PutItem`, each conditional on the version and the
//! claim, so that exactly one task decides per version.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::AttributeValue;

use super::record::Record;
use super::store::{StoreError, Stored, VerdictStore};

/// How long an item outlives its last decision.
const EXPIRES_AFTER: Duration = Duration::from_secs(7 * 24 * 3_600);

/// [`VerdictStore`] in a DynamoDB table whose partition key is the string `service`.
#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
    key: String,
}

impl DynamoStore {
    /// The store of `service` in `cluster`, in `table`, through the standard AWS
    /// configuration (credentials, Region, `AWS_ENDPOINT_URL_DYNAMODB`), with the
    /// SDK's retries off: the drain tries again at its own pace.
    pub async fn from_env(table: &str, cluster: &str, service: &str) -> Self {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .load()
            .await;
        Self::with_client(aws_sdk_dynamodb::Client::new(&sdk), table, cluster, service)
    }

    /// The same, for a local stand-in of DynamoDB at `endpoint` (moto, DynamoDB
    /// Local): Region `us-east-1`, fixed credentials, no retries.
    #[must_use]
    pub fn for_endpoint(endpoint: &str, table: &str, cluster: &str, service: &str) -> Self {
        use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region, retry::RetryConfig};
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("local", "local", None, None, "stand-in"))
            .retry_config(RetryConfig::disabled())
            .endpoint_url(endpoint)
            .build();
        Self::with_client(
            aws_sdk_dynamodb::Client::from_conf(config),
            table,
            cluster,
            service,
        )
    }

    fn with_client(
        client: aws_sdk_dynamodb::Client,
        table: &str,
        cluster: &str,
        service: &str,
    ) -> Self {
        Self {
            client,
            table: table.to_owned(),
            key: key(cluster, service),
        }
    }

    /// The item's key.
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// `<cluster name>/<service name>`: the cluster as a name whether ECS gave its ARN
/// (Fargate's task metadata) or its name (EC2's).
#[must_use]
pub fn key(cluster: &str, service: &str) -> String {
    let cluster = cluster.rsplit_once(":cluster/").map_or(cluster, |(_, n)| n);
    format!("{cluster}/{service}")
}

fn classify<E, R>(operation: &str, table: &str, err: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or_default();
            let text = format!(
                "{operation} on table {table}: {code}: {}",
                e.message().unwrap_or_default()
            );
            match code {
                "AccessDeniedException"
                | "ResourceNotFoundException"
                | "UnrecognizedClientException" => StoreError::Unusable(text),
                _ => StoreError::Unavailable(text),
            }
        }
        other => StoreError::Unavailable(format!("{operation} on table {table}: {other}")),
    }
}

fn conditional_failed<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool {
    matches!(err, SdkError::ServiceError(s) if s.err().code() == Some("ConditionalCheckFailedException"))
}

fn number(item: &HashMap<String, AttributeValue>, name: &str) -> Option<u64> {
    item.get(name)?.as_n().ok()?.parse().ok()
}

fn text<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> Option<&'a str> {
    item.get(name)?.as_s().ok().map(String::as_str)
}

/// The condition that the item is still at `version`.
fn at_version(version: u64) -> &'static str {
    if version == 0 {
        "attribute_not_exists(version)"
    } else {
        "version = :v"
    }
}

impl VerdictStore for DynamoStore {
    fn shared(&self) -> bool {
        true
    }

    async fn read(&self) -> Result<Option<Stored>, StoreError> {
        let answer = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("service", AttributeValue::S(self.key.clone()))
            .send()
            .await
            .map_err(|e| classify("GetItem", &self.table, e))?;
        let Some(item) = answer.item() else {
            return Ok(None);
        };
        let version = number(item, "version").unwrap_or(0);
        let record = match text(item, "record") {
            Some(json) => Record::from_json(json).map(std::sync::Arc::new),
            None => Err("no record yet".to_owned()),
        };
        let claim = text(item, "claim_owner")
            .zip(number(item, "claim_until"))
            .map(|(owner, until)| (owner.to_owned(), until));
        Ok(Some(Stored {
            version,
            record,
            claim,
        }))
    }

    async fn claim(
        &self,
        version: u64,
        owner: &str,
        now: u64,
        until: u64,
    ) -> Result<bool, StoreError> {
        let mut update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("service", AttributeValue::S(self.key.clone()))
            .update_expression("SET claim_owner = :me, claim_until = :until")
            .condition_expression(format!(
                "{} AND (attribute_not_exists(claim_until) OR claim_until < :now)",
                at_version(version)
            ))
            .expression_attribute_values(":me", AttributeValue::S(owner.to_owned()))
            .expression_attribute_values(":until", AttributeValue::N(until.to_string()))
            .expression_attribute_values(":now", AttributeValue::N(now.to_string()));
        if version > 0 {
            update =
                update.expression_attribute_values(":v", AttributeValue::N(version.to_string()));
        }
        match update.send().await {
            Ok(_) => Ok(true),
            Err(e) if conditional_failed(&e) => Ok(false),
            Err(e) => Err(classify("UpdateItem", &self.table, e)),
        }
    }

    async fn publish(
        &self,
        version: u64,
        owner: &str,
        record: &Record,
    ) -> Result<bool, StoreError> {
        let expires = record.decided_at / 1_000 + EXPIRES_AFTER.as_secs();
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("service", AttributeValue::S(self.key.clone()))
            .item("version", AttributeValue::N((version + 1).to_string()))
            .item("record", AttributeValue::S(record.to_json()))
            .item("expires_at", AttributeValue::N(expires.to_string()))
            .condition_expression(format!("claim_owner = :me AND {}", at_version(version)))
            .expression_attribute_values(":me", AttributeValue::S(owner.to_owned()));
        if version > 0 {
            put = put.expression_attribute_values(":v", AttributeValue::N(version.to_string()));
        }
        match put.send().await {
            Ok(_) => Ok(true),
            Err(e) if conditional_failed(&e) => Ok(false),
            Err(e) => Err(classify("PutItem", &self.table, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::key;

    #[test]
    fn the_key_names_the_cluster_the_same_way_from_an_arn_or_a_name() {
        assert_eq!(
            key("arn:aws:ecs:us-east-1:123456789012:cluster/prod", "web"),
            "prod/web"
        );
        assert_eq!(key("prod", "web"), "prod/web");
    }
}
