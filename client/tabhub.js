// tabhub browser client: placeholder, replaced by the client library.
export {};
