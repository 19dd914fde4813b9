//! Training: the `train-full` and `train-lora` kinds, their loop, optimizers, schedules,
//! data order and checkpoints.

pub mod checkpoint;
pub mod cpu;
pub mod data;
pub mod optim;
pub mod schedule;
pub mod stage;
pub mod trainer;
