//! Logging. PLACEHOLDER: being written by the config helper.
