//! Training: the `train-full` and `train-lora` kinds (and their cooldown trunks), their loop, optimizers, schedules,
//! data order, checkpoints and TensorBoard event files.

pub mod branch;
pub mod checkpoint;
pub mod cpu;
pub mod data;
pub mod hparams;
pub mod memory;
pub mod optim;
pub mod schedule;
pub mod stage;
pub mod tensorboard;
pub mod trainer;
