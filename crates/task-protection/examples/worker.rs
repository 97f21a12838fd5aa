//! The smallest worker: each job holds protection while it runs, so a scale-in or a
//! deployment never stops the task in the middle of one, and an idle worker is not
//! protected at all.
//!
//! Inside an ECS task the agent sets `ECS_AGENT_URI` and protection is real; anywhere
//! else it is simulated, so this runs on a laptop too:
//!
//! ```sh
//! cargo run -p task-protection --example worker
//! ```

use std::time::Duration;

use task_protection::{BackendConfig, ProtectionSettings, TaskProtection};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // TASK_PROTECTION_BACKEND picks the backend; unset, the ECS agent when
    // ECS_AGENT_URI is set, a local simulation outside ECS.
    let config = BackendConfig::from_env()?;
    let protection = TaskProtection::connect(&config, ProtectionSettings::default()).await?;

    // Stands in for a queue: five jobs, then the queue closes.
    let (queue, mut jobs) = tokio::sync::mpsc::channel::<u64>(8);
    tokio::spawn(async move {
        for job in 1..=5 {
            if queue.send(job).await.is_err() {
                break;
            }
        }
    });

    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        let job = tokio::select! {
            job = jobs.recv() => job,
            () = &mut stop => None,
        };
        let Some(job) = job else { break };
        // Start only once ECS has confirmed protection; give the job back otherwise
        // (a refusal means ECS is replacing this task).
        let guard = match protection.acquire().await {
            Ok(guard) => guard,
            Err(e) => {
                eprintln!("job {job} handed back: {e}");
                continue;
            }
        };
        tokio::time::sleep(Duration::from_millis(200)).await; // the work
        println!("job {job} done");
        drop(guard); // never waits; protection ends after the maintain window
    }

    // On SIGTERM ECS stops the task soon anyway: release protection now.
    println!("{}", protection.shutdown().await);
    Ok(())
}

/// SIGTERM (ECS stopping the task) or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
