//! The `flow` command line.

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Declarative, content-addressed pipelines for finetuning science.
#[derive(Parser)]
#[command(name = "flow", version, about, max_term_width = 100)]
struct Cli {
    /// Cache root [default: `[pipeline] cache`, else ./cache]
    #[arg(long, global = true, env = "FLOW_CACHE")]
    cache: Option<PathBuf>,
    /// Remote cache (s3://bucket/prefix or file:///dir) [default: `[pipeline] remote`]
    #[arg(long, global = true, env = "FLOW_REMOTE")]
    remote: Option<String>,
    /// Also print cached stages and debug logs
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Cmd,
}

/// Which pipeline, and what to change in it before validation.
#[derive(Args, Clone)]
pub struct PipelineArgs {
    /// The pipeline file (TOML)
    pub pipeline: PathBuf,
    /// Override a value: `stage.NAME.PARAM=VALUE` or `pipeline.KEY=VALUE` (VALUE is TOML)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Apply the pipeline's `[profile.NAME]` overlay (repeatable, in order)
    #[arg(long = "profile", value_name = "NAME")]
    pub profiles: Vec<String>,
    /// Mix a salt into every key (overrides `[pipeline] cache_salt`)
    #[arg(long)]
    pub salt: Option<String>,
}

/// How `flow run` runs.
#[derive(Args, Clone)]
pub struct RunArgs {
    /// Stages to run at once [default: `[executor] jobs`, else 1]
    #[arg(short, long)]
    pub jobs: Option<usize>,
    /// Threads per stage [default: the available cores, shared among the stages running]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Device of stages that name none: auto, cpu, wgpu, vulkan, metal, cuda [default: auto]
    #[arg(long)]
    pub device: Option<String>,
    /// Where stages run [default: `[executor] kind`, else local]
    #[arg(long, value_enum)]
    pub executor: Option<ExecutorArg>,
    /// With the slurm executor: follow the jobs to the end instead of returning at once
    #[arg(long)]
    pub wait: bool,
    /// One JSON object per line on stdout
    #[arg(long)]
    pub json: bool,
}

/// What `push` and `pull` move.
#[derive(Args, Clone)]
pub struct TransferArgs {
    /// The pipeline file (TOML)
    #[arg(required_unless_present = "all")]
    pub pipeline: Option<PathBuf>,
    /// Every result, of any pipeline
    #[arg(long, conflicts_with = "pipeline")]
    pub all: bool,
    /// Override a value: `stage.NAME.PARAM=VALUE` or `pipeline.KEY=VALUE` (VALUE is TOML)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Apply the pipeline's `[profile.NAME]` overlay (repeatable, in order)
    #[arg(long = "profile", value_name = "NAME")]
    pub profiles: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

impl TransferArgs {
    /// The pipeline arguments, unless --all.
    pub fn pipeline_args(&self) -> Option<PipelineArgs> {
        self.pipeline.clone().map(|pipeline| PipelineArgs {
            pipeline,
            sets: self.sets.clone(),
            profiles: self.profiles.clone(),
            salt: None,
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run what is missing; skip what is cached
    Run {
        #[command(flatten)]
        p: PipelineArgs,
        #[command(flatten)]
        r: RunArgs,
    },
    /// Cancel the pipeline's queued and running Slurm jobs
    Cancel {
        #[command(flatten)]
        p: PipelineArgs,
        #[arg(long)]
        json: bool,
    },
    /// Show what would run and why
    Plan {
        #[command(flatten)]
        p: PipelineArgs,
        #[arg(long)]
        json: bool,
    },
    /// Per stage: done / missing / running, with output paths
    Status {
        #[command(flatten)]
        p: PipelineArgs,
        #[arg(long)]
        json: bool,
    },
    /// Every component of a stage's cache key
    Explain {
        #[command(flatten)]
        p: PipelineArgs,
        /// Stage name (e.g. `train` or `lora[rank=64]`)
        stage: String,
        #[arg(long)]
        json: bool,
    },
    /// Print the stage DAG
    Dag {
        #[command(flatten)]
        p: PipelineArgs,
        #[arg(long, value_enum, default_value_t = DagFormat::Dot)]
        format: DagFormat,
    },
    /// Output files and metrics of a finished stage
    Show {
        #[command(flatten)]
        p: PipelineArgs,
        stage: String,
        #[arg(long)]
        json: bool,
    },
    /// Upload a pipeline's done stages (or, with --all, every local result) to the remote
    Push {
        #[command(flatten)]
        t: TransferArgs,
    },
    /// Download a pipeline's stages the remote has done (or, with --all, every remote result)
    Pull {
        #[command(flatten)]
        t: TransferArgs,
    },
    /// Delete cache entries that no kept pipeline references
    Gc {
        /// A pipeline whose current results are kept (repeatable)
        #[arg(long, value_name = "PIPELINE", required = true)]
        keep: Vec<PathBuf>,
        /// Profiles applied to every kept pipeline
        #[arg(long = "profile", value_name = "NAME")]
        profiles: Vec<String>,
        /// Only report what would be deleted
        #[arg(long)]
        dry_run: bool,
        /// Collect the remote cache (--remote) instead: a dry run unless --delete
        #[arg(long)]
        remote_cache: bool,
        /// With --remote-cache: really delete
        #[arg(long, requires = "remote_cache")]
        delete: bool,
        /// With --remote-cache: spare unreferenced objects younger than this many seconds
        /// (a push in flight uploads its objects before the record that references them)
        #[arg(long, value_name = "SECONDS", default_value_t = flow::remote::GC_GRACE_SECONDS)]
        grace: u64,
        #[arg(long)]
        json: bool,
    },
    /// The stage kinds this build knows, with their params and outputs
    Kinds {
        /// Only this kind
        kind: Option<String>,
        /// Markdown tables (what the README's reference is made of)
        #[arg(long)]
        markdown: bool,
    },
    /// Cache maintenance
    Cache {
        #[command(subcommand)]
        command: CacheCmd,
    },
    /// Runs one stage (the engine's child process; reads its spec on stdin)
    #[command(name = "__stage", hide = true)]
    Stage,
    /// Runs one stage as a cluster job (reads its job spec on stdin)
    #[command(name = "__job", hide = true)]
    Job,
}

/// `--executor`.
#[derive(Clone, Copy, ValueEnum)]
pub enum ExecutorArg {
    Local,
    Slurm,
}

#[derive(Subcommand)]
enum CacheCmd {
    /// Re-hash every stored object; report and evict damaged ones
    Verify {
        /// Verify the remote cache (--remote) instead of the local one
        #[arg(long)]
        remote_cache: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DagFormat {
    Dot,
    Mermaid,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Cmd::Plan { .. }
            | Cmd::Status { .. }
            | Cmd::Explain { .. }
            | Cmd::Dag { .. }
            | Cmd::Show { .. }
            | Cmd::Kinds { .. }
    ) {
        // Listings behave like other Unix tools when the reader goes away (`flow kinds |
        // head`): die quietly on SIGPIPE instead of panicking on a failed print. Commands
        // that talk to a remote keep Rust's default (EPIPE errors), which network code needs.
        // SAFETY: setting a signal disposition at startup, before any thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if matches!(cli.command, Cmd::Stage) {
        return ExitCode::from(commands::stage_child() as u8);
    }
    let filter = if cli.verbose { "info" } else { "warn" };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    let ctx = commands::Context {
        cache: cli.cache,
        remote: cli.remote,
        verbose: cli.verbose,
    };
    let result = match cli.command {
        Cmd::Run { p, r } => ctx.run(&p, r),
        Cmd::Cancel { p, json } => ctx.cancel(&p, json),
        Cmd::Job => ctx.job(),
        Cmd::Plan { p, json } => ctx.plan(&p, json),
        Cmd::Status { p, json } => ctx.status(&p, json),
        Cmd::Explain { p, stage, json } => ctx.explain(&p, &stage, json),
        Cmd::Dag { p, format } => ctx.dag(&p, format),
        Cmd::Show { p, stage, json } => ctx.show(&p, &stage, json),
        Cmd::Push { t } => match t.pipeline_args() {
            Some(p) => ctx.push(&p, t.json),
            None => ctx.push_all(t.json),
        },
        Cmd::Pull { t } => match t.pipeline_args() {
            Some(p) => ctx.pull(&p, t.json),
            None => ctx.pull_all(t.json),
        },
        Cmd::Gc {
            keep,
            profiles,
            dry_run,
            remote_cache: false,
            json,
            ..
        } => ctx.gc(&keep, &profiles, dry_run, json),
        Cmd::Gc {
            keep,
            profiles,
            delete,
            grace,
            json,
            ..
        } => ctx.gc_remote(&keep, &profiles, grace, !delete, json),
        Cmd::Cache {
            command:
                CacheCmd::Verify {
                    remote_cache: false,
                    json,
                },
        } => ctx.verify(json),
        Cmd::Cache {
            command: CacheCmd::Verify { json, .. },
        } => ctx.verify_remote(json),
        Cmd::Kinds { kind, markdown } => commands::kinds(kind.as_deref(), markdown),
        Cmd::Stage => unreachable!("handled above"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
