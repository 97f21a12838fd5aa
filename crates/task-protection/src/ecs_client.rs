//! The ECS API client this crate calls with, behind a type of its own so that the AWS
//! SDK's types stay out of the public API (they change with the SDK's releases, not
//! with this crate's).

/// An ECS API client, for [`EcsApiBackend`](crate::EcsApiBackend).
///
/// Its SDK retries are off: the callers retry and pace themselves, and SDK retries
/// would hide throttling from them and break their one-request-at-a-time rule.
#[derive(Debug, Clone)]
pub struct EcsClient {
    inner: aws_sdk_ecs::Client,
}

impl EcsClient {
    /// A client from the standard AWS configuration: the environment, the profile,
    /// the task role, and `AWS_ENDPOINT_URL_ECS` to point it at a stand-in.
    pub async fn from_env() -> Self {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .load()
            .await;
        Self {
            inner: aws_sdk_ecs::Client::new(&sdk),
        }
    }

    /// A client for an ECS-compatible endpoint (a stand-in in tests, LocalStack) in
    /// `region`, signing with fixed credentials.
    #[must_use]
    pub fn with_endpoint(
        endpoint_url: &str,
        region: &str,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> Self {
        let config = aws_sdk_ecs::Config::builder()
            .behavior_version(aws_sdk_ecs::config::BehaviorVersion::latest())
            .region(aws_sdk_ecs::config::Region::new(region.to_owned()))
            .credentials_provider(aws_sdk_ecs::config::Credentials::new(
                access_key_id,
                secret_access_key,
                None,
                None,
                "task-protection",
            ))
            .retry_config(aws_sdk_ecs::config::retry::RetryConfig::disabled())
            .endpoint_url(endpoint_url)
            .build();
        Self {
            inner: aws_sdk_ecs::Client::from_conf(config),
        }
    }

    pub(crate) fn sdk(&self) -> &aws_sdk_ecs::Client {
        &self.inner
    }
}
