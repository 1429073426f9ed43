//! Tests of the compiler as a whole: rendered rulesets.
