//! Fake requests and helpers for the scheduler's unit tests, which run the
//! ordering rules with a fake clock.

use std::time::Duration;

use super::queue::Queued;
use crate::throttle::{BucketKind, Direction, Limits};

pub(super) const KIB: u64 = 1024;

#[derive(Debug, PartialEq)]
pub(super) struct Fake {
    pub(super) id: u32,
    pub(super) dir: Option<Direction>,
    pub(super) bytes: u64,
}

impl Queued for Fake {
    fn direction(&self) -> Option<Direction> {
        self.dir
    }
    fn bytes(&self) -> u64 {
        self.bytes
    }
    fn unique(&self) -> u64 {
        self.id.into()
    }
}

pub(super) fn read(id: u32, bytes: u64) -> Fake {
    Fake {
        id,
        dir: Some(Direction::Read),
        bytes,
    }
}

pub(super) fn write(id: u32, bytes: u64) -> Fake {
    Fake {
        id,
        dir: Some(Direction::Write),
        bytes,
    }
}

pub(super) fn barrier(id: u32) -> Fake {
    Fake {
        id,
        dir: None,
        bytes: 0,
    }
}

pub(super) fn limits(kind: BucketKind, avg: u64) -> Limits {
    let mut l = Limits::default();
    l.get_mut(kind).avg = avg;
    l
}

pub(super) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub(super) fn ids(v: &[Fake]) -> Vec<u32> {
    v.iter().map(|f| f.id).collect()
}
