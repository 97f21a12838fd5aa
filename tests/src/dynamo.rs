//! DynamoDB on moto's server, for the drain's shared decision: the table the
//! deployment files create (partition key `service`, a string), made here the same
//! way.

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};

/// A DynamoDB client for the server at `endpoint`.
#[must_use]
pub fn client(endpoint: &str) -> aws_sdk_dynamodb::Client {
    use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "e2e"))
        .endpoint_url(endpoint)
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// Creates the drain's table `name` at `endpoint`, on demand, as the deployment files
/// do.
///
/// # Panics
/// When the server refuses.
pub async fn create_drain_table(endpoint: &str, name: &str) {
    client(endpoint)
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("service")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("an attribute definition"),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("service")
                .key_type(KeyType::Hash)
                .build()
                .expect("a key schema"),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("cannot create table {name}: {e:?}"));
}
