//! Configuration. PLACEHOLDER: being written by the config helper (see its brief).
