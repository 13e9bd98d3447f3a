//! A leg's body in pieces: slices of the client's bytes and the few the router writes
//! between them, sent one after another in one vectored write (a 100k-token prompt is
//! never copied per leg).

use bytes::{BufMut, Bytes, BytesMut};

/// A body in pieces, sent one after another (vectored writes): nothing concatenated.
#[derive(Clone, Default, Debug)]
pub struct Pieces(Vec<Bytes>);

impl Pieces {
    pub(crate) fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.0.push(b);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    pub(crate) fn chunks(&self) -> &[Bytes] {
        &self.0
    }

    /// One buffer: free when there is one piece, a copy otherwise.
    pub fn to_bytes(&self) -> Bytes {
        match self.0.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let mut out = BytesMut::with_capacity(self.len());
                for p in many {
                    out.put_slice(p);
                }
                out.freeze()
            }
        }
    }
}

impl From<Bytes> for Pieces {
    fn from(b: Bytes) -> Self {
        let mut p = Pieces::default();
        p.push(b);
        p
    }
}
