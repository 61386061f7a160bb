//! CRC-32C (Castagnoli), the checksum PostgreSQL's backup manifests use by default.

const fn table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

static TABLE: [u32; 256] = table();

/// A running CRC-32C.
#[derive(Debug, Clone, Copy)]
pub struct Crc32c(u32);

impl Default for Crc32c {
    fn default() -> Self {
        Crc32c(!0)
    }
}

impl Crc32c {
    pub fn update(&mut self, data: &[u8]) {
        let mut crc = self.0;
        for &byte in data {
            crc = TABLE[((crc ^ byte as u32) & 0xff) as usize] ^ (crc >> 8);
        }
        self.0 = crc;
    }

    pub fn finish(&self) -> u32 {
        !self.0
    }

    /// As a backup manifest writes it: the value's bytes in memory (little-endian) order, hex.
    pub fn manifest_hex(&self) -> String {
        hex::encode(self.finish().to_le_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::Crc32c;

    #[test]
    fn known_vectors() {
        let mut c = Crc32c::default();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xE306_9283);
        let mut split = Crc32c::default();
        split.update(b"1234");
        split.update(b"56789");
        assert_eq!(split.finish(), 0xE306_9283);
        assert_eq!(Crc32c::default().finish(), 0);
        // PG_VERSION containing "15\n", as in a real backup_manifest.
        let mut v = Crc32c::default();
        v.update(b"15\n");
        assert_eq!(v.manifest_hex(), "8a744722");
    }
}
