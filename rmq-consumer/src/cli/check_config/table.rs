//! An ordered table of keys for `check-config`: built from any `Serialize` value in the
//! order it serializes its fields (serde_json's own `Value` would sort them), printed as
//! TOML-like text or turned into JSON.

use std::io::Write;

use serde::{Serialize, ser};
use serde_json::{Map, Value};

/// An ordered list of keys: printed as TOML-like text in this order, or as a JSON object.
#[derive(Debug, Default)]
pub(super) struct Table(Vec<(String, Node)>);

/// A value, or a sub-table (a struct or map).
#[derive(Debug)]
pub(super) enum Node {
    Value(Value),
    Table(Table),
}

impl Table {
    /// `value` as a table: its structs and maps, nested, become sub-tables in their order;
    /// everything else is a JSON value. A value that is not a struct or map is an error.
    pub(super) fn of<T: Serialize + ?Sized>(value: &T) -> Result<Table, serde_json::Error> {
        match value.serialize(Ordered)? {
            Node::Table(table) => Ok(table),
            Node::Value(_) => Err(ser::Error::custom("expected a struct or a map")),
        }
    }

    pub(super) fn put(&mut self, key: &str, value: Value) {
        self.0.push((key.to_owned(), Node::Value(value)));
    }

    pub(super) fn put_table(&mut self, key: &str, table: Table) {
        self.0.push((key.to_owned(), Node::Table(table)));
    }

    /// The sub-table `key`, if there is one.
    pub(super) fn table_mut(&mut self, key: &str) -> Option<&mut Table> {
        self.0.iter_mut().find_map(|(k, node)| match node {
            Node::Table(table) if k == key => Some(table),
            _ => None,
        })
    }

    /// The sub-tables.
    pub(super) fn tables_mut(&mut self) -> impl Iterator<Item = &mut Table> {
        self.0.iter_mut().filter_map(|(_, node)| match node {
            Node::Table(table) => Some(table),
            Node::Value(_) => None,
        })
    }

    /// Leaves out the unset (`null`) values.
    pub(super) fn drop_unset(&mut self) {
        self.0
            .retain(|(_, node)| !matches!(node, Node::Value(Value::Null)));
    }

    pub(super) fn to_json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(key, node)| {
                    let value = match node {
                        Node::Value(value) => value.clone(),
                        Node::Table(table) => table.to_json(),
                    };
                    (key.clone(), value)
                })
                .collect::<Map<String, Value>>(),
        )
    }

    /// Scalars first (unset ones as comments), then each sub-table under its `[path]`.
    pub(super) fn write_toml(&self, out: &mut dyn Write, path: &str) -> std::io::Result<()> {
        let scalars: Vec<(&String, &Value)> = self
            .0
            .iter()
            .filter_map(|(key, node)| match node {
                Node::Value(value) => Some((key, value)),
                Node::Table(_) => None,
            })
            .collect();
        if !path.is_empty() && !scalars.is_empty() {
            writeln!(out, "\n[{path}]")?;
        }
        for (key, value) in scalars {
            match value {
                Value::Null => writeln!(out, "# {key} = (unset)")?,
                other => writeln!(out, "{key} = {other}")?,
            }
        }
        for (key, node) in &self.0 {
            if let Node::Table(table) = node {
                let path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                table.write_toml(out, &path)?;
            }
        }
        Ok(())
    }
}

/// The serializer behind [`Table::of`]: structs and maps become [`Node::Table`]s in the order
/// their entries come; anything else is left to `serde_json::value::Serializer`.
struct Ordered;

type Json = serde_json::value::Serializer;

/// A serde_json compound (a sequence, a variant) whose result becomes a [`Node::Value`].
struct Leaf<C>(C);

/// The entries of a struct or map so far, and a map's key waiting for its value.
struct Entries {
    table: Table,
    key: Option<String>,
}

impl ser::Serializer for Ordered {
    type Ok = Node;
    type Error = serde_json::Error;
    type SerializeSeq = Leaf<<Json as ser::Serializer>::SerializeSeq>;
    type SerializeTuple = Leaf<<Json as ser::Serializer>::SerializeTuple>;
    type SerializeTupleStruct = Leaf<<Json as ser::Serializer>::SerializeTupleStruct>;
    type SerializeTupleVariant = Leaf<<Json as ser::Serializer>::SerializeTupleVariant>;
    type SerializeMap = Entries;
    type SerializeStruct = Entries;
    type SerializeStructVariant = Leaf<<Json as ser::Serializer>::SerializeStructVariant>;

    fn serialize_bool(self, v: bool) -> Result<Node, Self::Error> {
        Ok(Node::Value(Value::Bool(v)))
    }
    fn serialize_i8(self, v: i8) -> Result<Node, Self::Error> {
        Ok(Node::Value(v.into()))
    }
    fn serialize_i16(self, v: i16) -> Result<Node, Self::Error> {
        Ok(Node::Value(v.into()))
    }
    fn serialize_i32(self, v: i32) -> Result<Node, Self::Error> {
        Ok(Node::Value(v.into()))
    }
    fn serialize_i64(self, v: i64) -> Result<Node, Self::Error> {
        Ok(Node::Value(v.into()))
    }
    fn serialize_i128(self, v: i128) -> Result<Node, Self::Error> {
        ser::Serializer::serialize_i128(Json {}, v).map(Node::Value)
    }
    fn serialize_u8(self, v: u8) -> Result<Node, Self::Error> {
        Ok(Node::Value(v.into()))
    }
    fn serialize_u16(self, v: u16) -> Result<Node, Self::Error> {
        Ok(Node::Value(v.into()))
    }
    fn serialize_u32(self, v: u32) -> Result<Node, Self::Error> {
        Ok(Node::Value(v.into()))
    }
    fn serialize_u64(self, v: u64) -> Result<Node, Self::Error> {
        Ok(Node::Value(v.into()))
    }
    fn serialize_u128(self, v: u128) -> Result<Node, Self::Error> {
        ser::Serializer::serialize_u128(Json {}, v).map(Node::Value)
    }
    fn serialize_f32(self, v: f32) -> Result<Node, Self::Error> {
        Ok(Node::Value(v.into()))
    }
    fn serialize_f64(self, v: f64) -> Result<Node, Self::Error> {
        Ok(Node::Value(v.into()))
    }
    fn serialize_char(self, v: char) -> Result<Node, Self::Error> {
        Ok(Node::Value(Value::String(v.to_string())))
    }
    fn serialize_str(self, v: &str) -> Result<Node, Self::Error> {
        Ok(Node::Value(Value::String(v.to_owned())))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Node, Self::Error> {
        ser::Serializer::serialize_bytes(Json {}, v).map(Node::Value)
    }
    fn serialize_none(self) -> Result<Node, Self::Error> {
        Ok(Node::Value(Value::Null))
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Node, Self::Error> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Node, Self::Error> {
        Ok(Node::Value(Value::Null))
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<Node, Self::Error> {
        Ok(Node::Value(Value::Null))
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Node, Self::Error> {
        self.serialize_str(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<Node, Self::Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Node, Self::Error> {
        ser::Serializer::serialize_newtype_variant(Json {}, name, index, variant, value)
            .map(Node::Value)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq, Self::Error> {
        ser::Serializer::serialize_seq(Json {}, len).map(Leaf)
    }
    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple, Self::Error> {
        ser::Serializer::serialize_tuple(Json {}, len).map(Leaf)
    }
    fn serialize_tuple_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct, Self::Error> {
        ser::Serializer::serialize_tuple_struct(Json {}, name, len).map(Leaf)
    }
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant, Self::Error> {
        ser::Serializer::serialize_tuple_variant(Json {}, name, index, variant, len).map(Leaf)
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, Self::Error> {
        Ok(Entries {
            table: Table::default(),
            key: None,
        })
    }
    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStruct, Self::Error> {
        self.serialize_map(None)
    }
    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant, Self::Error> {
        ser::Serializer::serialize_struct_variant(Json {}, name, index, variant, len).map(Leaf)
    }
}

impl Entries {
    fn push<T: Serialize + ?Sized>(
        &mut self,
        key: String,
        value: &T,
    ) -> Result<(), serde_json::Error> {
        let node = value.serialize(Ordered)?;
        self.table.0.push((key, node));
        Ok(())
    }
}

impl ser::SerializeMap for Entries {
    type Ok = Node;
    type Error = serde_json::Error;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Self::Error> {
        match key.serialize(Json {})? {
            Value::String(key) => self.key = Some(key),
            other => self.key = Some(other.to_string()),
        }
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Self::Error> {
        let key = self
            .key
            .take()
            .ok_or_else(|| ser::Error::custom("a map value without a key"))?;
        self.push(key, value)
    }
    fn end(self) -> Result<Node, Self::Error> {
        Ok(Node::Table(self.table))
    }
}

impl ser::SerializeStruct for Entries {
    type Ok = Node;
    type Error = serde_json::Error;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), Self::Error> {
        self.push(key.to_owned(), value)
    }
    fn end(self) -> Result<Node, Self::Error> {
        Ok(Node::Table(self.table))
    }
}

/// Forwards one serde_json compound trait to [`Leaf`], its result a [`Node::Value`].
macro_rules! leaf {
    ($trait:ident, $method:ident $(, $key:ty)?) => {
        impl<C: ser::$trait<Ok = Value, Error = serde_json::Error>> ser::$trait for Leaf<C> {
            type Ok = Node;
            type Error = serde_json::Error;

            fn $method<T: Serialize + ?Sized>(
                &mut self,
                $(key: $key,)?
                value: &T,
            ) -> Result<(), Self::Error> {
                self.0.$method($(leaf!(@key key $key),)? value)
            }
            fn end(self) -> Result<Node, Self::Error> {
                self.0.end().map(Node::Value)
            }
        }
    };
    (@key $key:ident $ty:ty) => { $key };
}

leaf!(SerializeSeq, serialize_element);
leaf!(SerializeTuple, serialize_element);
leaf!(SerializeTupleStruct, serialize_field);
leaf!(SerializeTupleVariant, serialize_field);
leaf!(SerializeStructVariant, serialize_field, &'static str);
